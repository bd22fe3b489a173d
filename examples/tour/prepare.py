"""Writes data/dataset.csv: y = 3x + 1 with a little noise."""

import argparse
import os
import random

parser = argparse.ArgumentParser()
parser.add_argument("--rows", type=int, default=1000)
args = parser.parse_args()

os.makedirs("data", exist_ok=True)
random.seed(0)
with open("data/dataset.csv", "w") as f:
    f.write("x,y\n")
    for _ in range(args.rows):
        x = random.uniform(-1, 1)
        f.write(f"{x:.6f},{3 * x + 1 + random.gauss(0, 0.05):.6f}\n")
print(f"wrote {args.rows} rows to data/dataset.csv (run {os.environ.get('RUN_NAME')})")
