"""The KV-transfer flags of ``serve`` (lesson 14), light to import (no torch): see `kv_routes`."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional


@dataclass
class KVConfig:
    connector: str
    rank: int
    world_size: int
    master_port: int
    master_addr: str = "127.0.0.1"
    hold_timeout_s: float = 30.0
    attach_timeout_s: float = 30.0
    migration_stop_threshold_blocks: int = 1


def add_kv_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("kv transfer", "disaggregated prefill and live migration between replicas (lesson 14)")
    g.add_argument("--kv-connector", default=None, choices=["gloo"],
                   help="join a KV group: torch.distributed point-to-point (gloo on CPU, NCCL on CUDA)")
    g.add_argument("--kv-rank", type=int, default=None, help="this replica's rank in the KV group (its index)")
    g.add_argument("--kv-world-size", type=int, default=None, help="replicas in the KV group")
    g.add_argument("--kv-master-port", type=int, default=None, help="rank 0's rendezvous port")
    g.add_argument("--kv-master-addr", default="127.0.0.1", help="rank 0's address (default: 127.0.0.1)")
    g.add_argument("--kv-hold-timeout-s", type=float, default=30.0,
                   help="a prefilled request's KV is freed if not pulled within this long (default: 30)")
    g.add_argument("--kv-attach-timeout-s", type=float, default=30.0,
                   help="a migrated-in request is aborted if nobody attaches within this long (default: 30)")


def kv_config_from_args(args, engine_flags: dict) -> Optional[KVConfig]:
    """The KV config of the flags (None without --kv-connector); ValueError naming a bad flag or combination."""
    given = [n for n in ("kv_rank", "kv_world_size", "kv_master_port") if getattr(args, n, None) is not None]
    if getattr(args, "kv_connector", None) is None:
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} needs --kv-connector")
        return None
    missing = [n for n in ("kv_rank", "kv_world_size", "kv_master_port") if n not in given]
    if missing:
        raise ValueError(f"--kv-connector needs --{missing[0].replace('_', '-')}")
    if args.engine != "llm":
        raise ValueError("--kv-connector needs --engine llm (the eager baseline has no paged KV to move)")
    if (engine_flags.get("tensor_parallel_size") or 1) > 1:
        raise ValueError("--kv-connector is not supported with --tensor-parallel-size > 1 (both need the "
                         "process's torch.distributed group)")
    if engine_flags.get("speculative_method"):
        raise ValueError("--kv-connector is not supported with speculative decoding")
    return KVConfig(args.kv_connector, args.kv_rank, args.kv_world_size, args.kv_master_port, args.kv_master_addr,
                    args.kv_hold_timeout_s, args.kv_attach_timeout_s)
