"""Trains the example early-exit network (mobilenet_ee.py) on Fashion-MNIST.

Uses the same train/validation split as branchpoint (fmnist.py), so the
validation inputs branchpoint calibrates on stay unseen. Every exit is
trained at once: the loss is 0.5 x each branch's cross-entropy plus the
final exit's, as for the built-in models. Writes the state dict that
mobilenet_ee.toml names, and a JSON record of the run beside it:

    .venv/bin/python python/train_example.py --out models/mobilenet-ee-fmnist.pt
    .venv/bin/python python/export.py python/mobilenet_ee.toml --out models/mobilenet-ee-fmnist
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fmnist  # noqa: E402
import mobilenet_ee  # noqa: E402

BRANCH_WEIGHT = 0.5


def accuracies(model, x, y, batch: int = 1000) -> list[float]:
    """Accuracy of every exit on (x, y)."""
    model.eval()
    right = None
    with torch.no_grad():
        for i in range(0, len(y), batch):
            exits = model(x[i : i + batch])
            hits = [int((e.argmax(1) == y[i : i + batch]).sum()) for e in exits]
            right = hits if right is None else [a + b for a, b in zip(right, hits)]
    return [r / len(y) for r in right]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="Train the example early-exit MobileNetV2-style network on Fashion-MNIST.")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("models/mobilenet-ee-fmnist.pt"), help="state dict to write [default: models/mobilenet-ee-fmnist.pt]")
    p.add_argument("--data-dir", type=pathlib.Path, default=fmnist.DEFAULT_DIR, help=f"Fashion-MNIST's folder [default: {fmnist.DEFAULT_DIR}]")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="Adam's learning rate, cosine-annealed to 0 [default: 0.002]")
    p.add_argument("--subset", type=int, default=0, help="train on only the first N training images (0: all) [default: 0]")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=2021)
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.threads < 1 or not args.lr > 0:
        print("error: --epochs, --batch-size and --threads must be at least 1 and --lr positive", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    # Subnormal floats are 10-100x slower on some CPUs; flush them, as the
    # Rust side does on every tensor thread.
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    try:
        data = fmnist.load(args.data_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    x, y = data["train"]
    if args.subset:
        x, y = x[: args.subset], y[: args.subset]
    model = mobilenet_ee.build()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = args.epochs * math.ceil(len(y) / args.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(args.seed)
    started = time.monotonic()
    history = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(y), generator=g)
        total, n = 0.0, 0
        for i in range(0, len(y), args.batch_size):
            idx = order[i : i + args.batch_size]
            exits = model(x[idx])
            losses = [F.cross_entropy(e, y[idx]) for e in exits]
            loss = BRANCH_WEIGHT * sum(losses[:-1]) + losses[-1]
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            n += len(idx)
        val = accuracies(model, *data["validation"])
        history.append({"epoch": epoch, "loss": total / n, "validation_accuracy": val, "elapsed_s": round(time.monotonic() - started, 1)})
        print(f"epoch {epoch}: loss {total / n:.4f}, validation accuracy per exit {[round(a, 4) for a in val]} ({time.monotonic() - started:.0f} s)", flush=True)
    test = accuracies(model, *data["test"])
    print(f"test accuracy per exit (branch 1, 2, 3, final): {[round(a, 4) for a in test]}")
    # Weights saved with subnormals flushed to zero, as the built-in models are.
    state = {k: torch.where(v.abs() < torch.finfo(torch.float32).tiny, torch.zeros_like(v), v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    record = {
        "architecture": "mobilenet_ee.py",
        "split": {"seed": fmnist.SEED, "train": len(data["train"][1]), "used": len(y), "validation": len(data["validation"][1]), "test": len(data["test"][1])},
        "config": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "branch_weight": BRANCH_WEIGHT, "threads": args.threads, "seed": args.seed},
        "torch": torch.__version__.split("+")[0],
        "history": history,
        "test_accuracy": test,
        "seconds": round(time.monotonic() - started, 1),
    }
    args.out.with_suffix(".training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.training.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
