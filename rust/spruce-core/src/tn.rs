//! Tensor networks: contraction-path optimization, TT/MPO/Tucker decompositions.
