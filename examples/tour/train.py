"""Fits y = a*x + b to data/dataset.csv (the artifact of prepare:latest) by gradient descent."""

import argparse
import os

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=3)
args = parser.parse_args()

rows = [tuple(map(float, line.split(","))) for line in open("data/dataset.csv").read().splitlines()[1:]]
a = b = 0.0
for epoch in range(1, args.epochs + 1):
    for _ in range(200):
        ga = sum((a * x + b - y) * x for x, y in rows) / len(rows)
        gb = sum((a * x + b - y) for x, y in rows) / len(rows)
        a, b = a - 0.5 * ga, b - 0.5 * gb
    loss = sum((a * x + b - y) ** 2 for x, y in rows) / len(rows)
    print(f"epoch {epoch}: a={a:.3f} b={b:.3f} loss={loss:.5f}", flush=True)

os.makedirs("checkpoint", exist_ok=True)
with open("checkpoint/model.txt", "w") as f:
    f.write(f"a={a}\nb={b}\n")
print("saved checkpoint/model.txt")
