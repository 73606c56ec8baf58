"""What every contender shares: its command line and its one-line JSON report.

Deliberately free of torch and paddle imports, so each contender loads only its own framework.
"""
from __future__ import annotations

import argparse
import json
import resource


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=("mlp", "cnn"), required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--batches", type=int, default=None, help="training batches (default: a full epoch)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the PyTorch contenders)")
    return p.parse_args()


def report(train_ips: float, eval_ips: float, last_loss: float) -> None:
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB
    print(json.dumps({"train_ips": train_ips, "eval_ips": eval_ips, "peak_rss_mb": rss_mb, "last_loss": last_loss}))
