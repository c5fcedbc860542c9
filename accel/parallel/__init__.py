"""Parallelism across processes on torch.distributed: the mesh, sequence sharding, sharded attention, CFG
branches on their own ranks. The `parallel=mesh` strategy (accel.strategies.parallel) puts them together."""
