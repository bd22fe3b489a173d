#!/usr/bin/env bash
# GPU check on a machine with an NVIDIA GPU and no package registry (the device machine lent to some
# sessions): GPU detection by the runner, and `gpu: N` workflows end to end on the local runner, on the host.
#   the wheels the machine lacks travel in .whl/ (bench/README.md, "GPU check"); $OUT collects the log
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
exec > >(tee "$OUT/gpu_check.log") 2>&1
step() { echo; echo "=== $*"; }
check() { if grep -qF -- "$2" "$3"; then echo "PASS: $1"; else echo "FAIL: $1"; fi; }

step "machine"
nvidia-smi -L || echo "no nvidia-smi"
python3 --version
command -v docker && docker info --format '{{.ServerVersion}} runtimes={{.Runtimes}}' 2>&1 | head -2

step "install (no index: wheels from .whl/, dstack from this tree)"
site=/tmp/dstack-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$site" . || exit 1
export PYTHONPATH="$site" PATH="$site/bin:$PATH"
export DSTACK_HOME="$(mktemp -d)/dstack-home"
dstack --version

step "dstack-runner check (what this machine offers)"
dstack-runner check

step "a project with GPU workflows"
project="$(mktemp -d)/gpu-project"
mkdir -p "$project/.dstack"
cat > "$project/gpu.py" <<'PY'
import os
import torch
print("CUDA_VISIBLE_DEVICES=" + repr(os.environ.get("CUDA_VISIBLE_DEVICES")))
print("cuda", torch.cuda.is_available(), torch.cuda.device_count())
if torch.cuda.is_available():
    x = torch.ones(2048, 2048, device="cuda")
    print(torch.cuda.get_device_name(0), "sum", (x @ x).sum().item())
PY
cat > "$project/.dstack/workflows.yaml" <<'YAML'
workflows:
  - name: matmul
    help: a matrix product on the GPU through PyTorch, its result saved
    commands:
      - nvidia-smi -L
      - mkdir -p out
      - python3 gpu.py | tee out/result.txt
    artifacts:
      - out
    resources:
      gpu: $gpu
  - name: by-name
    commands:
      - python3 gpu.py
    resources:
      h200/gpu: 1
  - name: wrong-model
    commands: [echo never]
    resources:
      a100/gpu: 1
  - name: too-many
    commands: [echo never]
    resources:
      gpu: 2
  - name: hold
    commands:
      - echo "start $(date +%s.%N) gpus=$CUDA_VISIBLE_DEVICES"
      - sleep 3
      - echo "end $(date +%s.%N)"
    resources:
      gpu: 1
YAML
cat > "$project/.dstack/variables.yaml" <<'YAML'
variables:
  matmul:
    gpu: 1
YAML
cd "$project"
step "dstack run matmul --help"; dstack run matmul --help
step "dstack run matmul"; dstack run matmul 2>&1 | tee /tmp/matmul.out
step "dstack run by-name (h200/gpu: 1)"; dstack run by-name 2>&1 | tee /tmp/byname.out
step "dstack run wrong-model (a100/gpu: 1): refused"; dstack run wrong-model 2>&1 | tee /tmp/wrong.out
step "dstack run too-many (gpu: 2): refused"; dstack run too-many 2>&1 | tee /tmp/many.out
step "dstack run matmul --gpu 0 (no GPU asked for)"; dstack run matmul --gpu 0 2>&1 | tee /tmp/nogpu.out
step "two gpu: 1 jobs at once on one GPU: the second waits for the first"
dstack run hold -d && dstack run hold -d
python3 - > /tmp/hold.out <<'PY'
import json, subprocess, time
deadline = time.time() + 60
while time.time() < deadline:
    runs = [r for r in json.loads(subprocess.run(["dstack", "status", "--json"], capture_output=True, text=True).stdout)
            if r["workflow"] == "hold"]
    if len(runs) == 2 and all(r["status"] in ("DONE", "FAILED") for r in runs):
        break
    time.sleep(0.5)
logs = [subprocess.run(["dstack", "logs", r["run_name"]], capture_output=True, text=True).stdout for r in runs]
print(logs)
spans = sorted((float(l.split("start ")[1].split()[0]), float(l.split("end ")[1].split()[0])) for l in logs)
print("apart" if spans[1][0] >= spans[0][1] else "overlapping", spans)
print("gpus", sorted(l.split("gpus=")[1].split()[0] for l in logs))
PY
cat /tmp/hold.out
step "dstack status"; dstack status
step "dstack runners"; dstack runners
step "artifact"
dstack artifacts list "$(dstack status --json | python3 -c 'import json,sys; print([r for r in json.load(sys.stdin) if r["workflow"]=="matmul"][-1]["run_name"])')" --files
dstack server stop --force
step "server log (warnings and errors)"; grep -E "WARNING|ERROR|Traceback" "$DSTACK_HOME/server/server.log" | head -20
step "checks"
check "gpu: 1 sees GPU 0 only" "CUDA_VISIBLE_DEVICES='0'" /tmp/matmul.out
check "gpu: 1 computes on the H200" "NVIDIA H200 sum 8589934592.0" /tmp/matmul.out
check "h200/gpu: 1 runs" "NVIDIA H200 sum" /tmp/byname.out
check "a100/gpu: 1 is refused, naming the GPUs there are" "the GPUs there are NVIDIA H200" /tmp/wrong.out
check "gpu: 2 is refused with what fits" "\`gpu: 1\` fits" /tmp/many.out
check "gpu: 0 sees no GPU" "CUDA_VISIBLE_DEVICES=''" /tmp/nogpu.out
check "gpu: 0 has no CUDA device" "cuda False 0" /tmp/nogpu.out
check "two gpu: 1 jobs never share the one GPU" "apart" /tmp/hold.out
check "each had GPU 0" "gpus ['0', '0']" /tmp/hold.out
exit 0
