#!/usr/bin/env bash
# The GPU checks of the foundation (SFT MFU) and sampler (generate ratio, roofline) issues,
# as one prepared run for a session that is lent a device machine (one H100 or H200).
#
#   bash scripts/device_checks.sh --fetch     # here, once: wheels the device lacks -> .whl/
#   # then the device tool: command "bash scripts/device_checks.sh", carry [".whl"],
#   # timeout_s 600; results (one log per phase, and all.log) come back from $OUT.
#   bash scripts/device_checks.sh sft         # or some phases: sampler64 sampler256 sft gputests
#                                             # (and profile, samplerflags, sftremat, sftswiglu:
#                                             # not in the default run)
#
# The device machine's image (Python 3.12; ../.library/device/KINDS.md) has jax (CUDA), flax,
# optax, orbax, transformers, torch, absl-py and PyYAML, but not ml-collections (its
# pure-Python wheel is carried in .whl/); the benchmarks need nothing else (grain is imported
# only by the data pipelines). Each phase runs under its own time limit and writes its log as it
# goes, so a phase that overruns costs only itself. Measured on an H100 (2026-11-27/28, jax
# 0.11.2): machine start to first log ~30 s, wheels ~10 s, sft (both sides) 126 s, gputests
# 38-43 s; our sampler side 20-27 s of compile per loop; `generate` alone at batch 64, in its
# own process: 41 s (its first call 18.9 s, then 4.0 s a call).
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}

if [[ "${1:-}" == "--fetch" ]]; then
  # For the device image's Python 3.12 (KINDS.md); ml-collections is pure Python and its
  # needs (absl-py, PyYAML) are on the image.
  mkdir -p .whl
  "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "ml-collections==1.1.0"
  ls -l .whl
  exit 0
fi

smoke=0
if [[ "${1:-}" == "--smoke" ]]; then smoke=1; shift; fi  # tiny sizes on any machine (tests)
out=${OUT:-device_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1  # a phase killed at its limit still leaves what it printed
phases=("$@")
# The samplers first: their same-call `generate` ratio is the one GPU figure not yet measured.
# sampler256 last: with start-up the four limits (240 + 170 + 60 + 200 s) pass the device tool's
# 600 s a call, so it may need a call of its own (`bash scripts/device_checks.sh sampler256`).
[[ ${#phases[@]} -eq 0 ]] && phases=(sampler64 sft gputests sampler256)
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$out/all.log"; }

if ! "$py" -c "import ml_collections" 2>/dev/null; then
  log "installing the carried wheels (.whl/) into /tmp/site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$out/all.log" 2>&1 ||
    { log "FAILED: no wheels in .whl/ (run scripts/device_checks.sh --fetch here first)"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || ((smoke))
  "$py" -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, jax.devices(), \
'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, \
'transformers', transformers.__version__)"
} >>"$out/all.log" 2>&1 || { log "FAILED: the environment check"; exit 1; }

gpu_apps() {  # processes holding the GPU (a phase killed at its limit must not linger)
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>&1 | tr '\n' ';'
  fi
}

run_phase() {  # name, time limit (s), command...
  local name=$1 limit=$2
  shift 2
  log "$name: $*"
  log "$name: GPU processes before: [$(gpu_apps)]"
  # timeout signals its whole process group (the benchmarks' per-side child processes too);
  # -k: SIGKILL 5 s later for anything that outlives SIGTERM.
  timeout -k 5 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  ((rc == 0)) || failed+=("$name")
  grep -E "ratio|MFU|roofline|decode|critic_jax|pytorch|autocast|transformers|passed|failed|skipped|FAILED|Error|round" \
    "$out/$name.log" | tail -n 24 | tee -a "$out/all.log"
  log "$name: exit $rc"
}

# The issue's shapes; --smoke shrinks them (and keeps every flag but cuDNN) to check the script.
preset=llama_0.9b sft_shape=(--batch 8 --seq 2048) attn=cudnn
gen=(--prompt-len 128 --new-tokens 256 --kv-chunk 64) b64=64 b256=256
if ((smoke)); then
  preset=tiny sft_shape=(--batch 2 --seq 32) attn=auto
  gen=(--prompt-len 8 --new-tokens 8 --kv-chunk 4) b64=2 b256=4
fi
failed=()
for phase in "${phases[@]}"; do
  case $phase in
    gputests)  # cuDNN attention against XLA's on the real kernel (skipped off GPUs)
      run_phase gputests 60 "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py ;;
    sft)  # issue target: >= 50% MFU (PyTorch + transformers: 36% per ENVIRONMENT.md)
      # No rematerialisation: 177.2 ms/step against 187.5 with dots_no_batch (H100, 2026-11-28).
      run_phase sft 170 "$py" scripts/bench_sft.py --preset $preset "${sft_shape[@]}" \
        --dtype bfloat16 --attention $attn --remat none --steps 8 --warmup 2 --torch \
        --no-autocast ;;
    sampler64)  # issue target: >= 20x generate at batch 64
      # The device loop: 543.8 ms against the host loop's 585.5 here (H100, one run each). Our
      # side's process took ~140 s on 2026-11-28 (params then initialised on the GPU: now on
      # the CPU, `init_s`), `generate`'s ~45 s; `generate` now runs first in a one-round run.
      run_phase sampler64 240 "$py" scripts/bench_sampler.py --preset $preset \
        --dtype bfloat16 --batch $b64 "${gen[@]}" --repeats 1 --loop device ;;
    sampler256)  # issue target: >= 50% of the memory-bandwidth roofline at batch 256
      run_phase sampler256 200 "$py" scripts/bench_sampler.py --preset $preset \
        --dtype bfloat16 --batch $b256 "${gen[@]}" --repeats 1 --loop device ;;
    profile)  # where our steps' time goes (not in the default run): the op tables in profile.log
      prof=/tmp/critic_jax_profile
      rm -rf "$prof"
      run_phase profile_sft 120 env XLA_FLAGS="--xla_dump_to=$prof/hlo_sft --xla_dump_hlo_as_text" \
        "$py" scripts/bench_sft.py --side jax --preset $preset "${sft_shape[@]}" \
        --dtype bfloat16 --attention $attn --remat none --steps 2 --warmup 1 \
        --profile "$prof/sft"
      run_phase profile_sampler 120 \
        env XLA_FLAGS="--xla_dump_to=$prof/hlo_sampler --xla_dump_hlo_as_text" \
        "$py" scripts/bench_sampler.py --side ours --preset $preset --dtype bfloat16 --batch $b64 \
        "${gen[@]}" --repeats 1 --loop device --profile "$prof/sampler" --profile-runs 1
      for what in sft sampler; do
        timeout 60 "$py" scripts/profile_ops.py "$prof/$what" --hlo "$prof/hlo_$what" \
          >>"$out/profile.log" 2>&1 || failed+=("profile_ops $what")
        # The raw trace comes back too (flat: the device tool returns files two folders deep).
        f=$(find "$prof/$what" -name '*.xplane.pb' -size -16M | head -n 1)
        [[ -n "$f" ]] && cp "$f" "$out/profile_$what.xplane.pb"
      done
      for name in profile_sft profile_sampler; do  # the tables say it all, unless it failed
        [[ " ${failed[*]} " == *" $name "* ]] || rm -f "$out/$name.log"
      done
      log "profile: tables in profile.log" ;;
    samplerflags)  # our decode loop alone, default XLA flags then while loops as CUDA graphs
      # (not in the default run). The batch-64 step is 1.86 ms against a 0.95 ms bandwidth
      # floor; ~300 small kernels a step would cost that much in launches if the loop body
      # is not one graph. Not measured yet: this phase compares.
      for flags in "" "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"; do
        run_phase "samplerflags${flags:+_while}" 120 env XLA_FLAGS="$flags" "$py" \
          scripts/bench_sampler.py --side ours --preset $preset --dtype bfloat16 --batch $b64 \
          "${gen[@]}" --repeats 3 --loop device
      done ;;
    sftremat)  # our side alone with dots_no_batch rematerialisation (not in the default run)
      run_phase sftremat 120 "$py" scripts/bench_sft.py --preset $preset "${sft_shape[@]}" \
        --dtype bfloat16 --attention $attn --remat dots_no_batch --steps 8 --warmup 2 ;;
    sftswiglu)  # our side alone with model.swiglu_recompute (not in the default run): XLA's
      # CSE otherwise keeps a float32 [B, T, F] sigmoid per layer for the backward (seen in the
      # CPU HLO); compare its ms/step and device peak with the sft phase's critic_jax line.
      run_phase sftswiglu 120 "$py" scripts/bench_sft.py --preset $preset "${sft_shape[@]}" \
        --dtype bfloat16 --attention $attn --remat none --swiglu-recompute --steps 8 --warmup 2 ;;
    *) log "unknown phase $phase (known: sampler64 sampler256 sft gputests profile samplerflags sftremat sftswiglu)"
       exit 2 ;;
  esac
done
if ((${#failed[@]})); then log "done; failed: ${failed[*]}"; exit 1; fi
log "done"
