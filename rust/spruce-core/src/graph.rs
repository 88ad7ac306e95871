//! Graphs: CSR construction and normalization, SpMM, segment and scatter reductions.
