//! Structured matrices: butterfly, Monarch, orthogonal butterfly (BOFT/OFT), Kronecker, Walsh-Hadamard.
