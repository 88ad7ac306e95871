//! Pruning kernels (scores, statistics, the batched two-sample Kolmogorov-Smirnov test).
