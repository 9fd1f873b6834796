"""Scale-out on the distributed engines the field trusts: tensor parallelism on
torch.distributed (`parallel`, `tp`, `worker`) and serving replicas on Ray
(`ray_replicas`, imported only when asked for: CPU users without Ray are unaffected)."""
