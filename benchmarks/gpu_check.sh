#!/usr/bin/env bash
# The GPU path, verified in one go (about 3 minutes on one modern GPU, at most the sum of the
# timeouts, 7), into ONE JSON:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]              # default benchmarks/results/gpu-check
#   bash benchmarks/gpu_check.sh --cpu-smoke OUT_DIR    # the CI-size CPU fallback
#
# Parts, each under its own `timeout`, each a record in OUT_DIR/gpu-check.json:
#   cuda_tests    python -m pytest -q -m cuda tests/test_cuda.py tests/test_optim.py
#                                                       (CUDA = CPU numbers; the optimizers'
#                                                        fused skip and resume on CUDA;
#                                                        a bf16 autocast epoch stays finite)
#   triton_tests  python -m pytest -q -m cuda tests/test_bk_triton.py  (the BK core's Triton
#                                                        kernels and the linear scan, compiled,
#                                                        against the PyTorch scans, N to 16,384)
#   epoch         benchmarks/gpu_epoch.py              (the proxy's epoch, 59 x 32 x 128, vocab
#                                                        30,000, real Trainer, fp32 and bf16)
#   bench         benchmarks/bench.py --only step,bk,fused --quick  (fused: the Triton kernels
#                                                        vs the scan at B=32 N=128 and longer N)
#   context       benchmarks/context.py --quick        (ResNet-BK vs the Transformer over N)
# Without CUDA (or with --cpu-smoke) the same parts run at CI size on the CPU, and what needs
# CUDA (the CUDA and Triton tests, bf16 autocast) is skipped with one line each. The script
# exits 0 when every part that ran passed, 1 if one failed or timed out. PYTHON overrides the
# interpreter.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
MODE=auto
if [ "${1:-}" = "--cpu-smoke" ]; then MODE=cpu; shift; fi
OUT=${1:-benchmarks/results/gpu-check}
PARTS="$OUT/parts"
rm -rf "$PARTS" && mkdir -p "$PARTS"
START=$(date +%s.%N)

if [ "$MODE" = auto ]; then
    if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        MODE=cuda
    else
        MODE=cpu
        echo "gpu_check: no CUDA device here; running the CI-size CPU fallback"
    fi
fi

skip() {  # skip NAME REASON
    echo "skipped $1: $2"
    printf '{"status": "skipped", "reason": "%s"}\n' "$2" > "$PARTS/$1.status.json"
}

part() {  # part NAME TIMEOUT_S COMMAND...: run it, keep its log, exit code and time
    local name=$1 limit=$2 t0 rc status command
    shift 2
    command="$*"
    command=${command//\\/\\\\}
    command=${command//\"/\\\"}
    echo "gpu_check: $name (timeout ${limit} s): $*"
    t0=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@" > "$PARTS/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    printf '{"status": "%s", "rc": %d, "ms": %d, "command": "%s"}\n' "$status" "$rc" \
        $(( ($(date +%s%N) - t0) / 1000000 )) "$command" > "$PARTS/$name.status.json"
    echo "gpu_check: $name $status (exit $rc)"
    tail -n 3 "$PARTS/$name.log" | sed 's/^/    /'
}

if [ "$MODE" = cuda ]; then
    # only this file: collecting all tests would need the notebook extras, which a GPU image may lack
    part cuda_tests 60 "$PY" -m pytest -q -m cuda tests/test_cuda.py tests/test_optim.py
    # (the first use of each kernel variant compiles it: a second or two, cached after)
    part triton_tests 150 "$PY" -m pytest -q -m cuda tests/test_bk_triton.py
    part epoch 75 "$PY" benchmarks/gpu_epoch.py --device cuda --out "$PARTS/epoch.json"
    part bench 90 "$PY" benchmarks/bench.py --only step,bk,fused --quick --device cuda \
        --out "$PARTS/bench.json"
    part context 45 "$PY" benchmarks/context.py --quick --device cuda --out "$PARTS/context.json"
else
    skip cuda_tests "needs a CUDA device (tests marked cuda)"
    skip triton_tests "needs a CUDA device (the CPU runs them in Triton's interpreter, in CI)"
    # gpu_epoch.py itself skips bf16 autocast on the CPU, with its line
    part epoch 60 "$PY" benchmarks/gpu_epoch.py --device cpu --batches 2 \
        --batch-size 4 --n-seq 32 --vocab 500 --eval-batches 1 --warmup-steps 1 \
        --out "$PARTS/epoch.json"
    part bench 60 "$PY" benchmarks/bench.py --only bk --quick --device cpu --threads 1 \
        --out "$PARTS/bench.json"
    skip bench_step "the proxy-size step section is a CUDA-size workload; CI runs only bk"
    part context 60 "$PY" benchmarks/context.py --device cpu --lengths 32,128 --tokens 256 \
        --vocab 200 --repeats 1 --out "$PARTS/context.json"
fi

"$PY" - "$OUT" "$MODE" "$START" <<'EOF'
import json, sys, time
from pathlib import Path

out, mode, start = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
parts = {}
for status in sorted((out / "parts").glob("*.status.json")):
    name = status.name[: -len(".status.json")]
    parts[name] = json.loads(status.read_text())
    if "ms" in parts[name]:
        parts[name]["seconds"] = parts[name].pop("ms") / 1000
    result = out / "parts" / f"{name}.json"
    if result.is_file():
        parts[name]["result"] = json.loads(result.read_text())
    log = out / "parts" / f"{name}.log"
    if log.is_file():
        parts[name]["log_tail"] = log.read_text().splitlines()[-20:]
record = {"mode": mode, "cuda": mode == "cuda", "wall_s": time.time() - start,
          "skipped": {n: p["reason"] for n, p in parts.items() if p["status"] == "skipped"},
          # and what a part skipped inside (gpu_epoch.py: bf16 autocast without CUDA)
          "skipped_inside": {f"{n}.{k}": why for n, p in parts.items()
                             for k, why in p.get("result", {}).get("skipped", {}).items()},
          "failed": [n for n, p in parts.items() if p["status"] in ("failed", "timeout")],
          "parts": parts}
(out / "gpu-check.json").write_text(json.dumps(record, indent=2) + "\n")
print(f"gpu_check: wrote {out / 'gpu-check.json'} ({mode}, {record['wall_s']:.0f} s; "
      f"failed: {', '.join(record['failed']) or 'none'}; "
      f"skipped: {', '.join([*record['skipped'], *record['skipped_inside']]) or 'none'})")
sys.exit(1 if record["failed"] else 0)
EOF
