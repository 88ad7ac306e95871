//! Fused GNN-to-MLP distillation losses (KD, GLNN, FF-G2M, KRD, NOSMOG similarity).
