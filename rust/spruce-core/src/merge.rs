//! Model merging kernels (task arithmetic, TIES, DARE, DELLA, breadcrumbs, PCB, Fisher).
