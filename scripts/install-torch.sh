#!/bin/sh
# Installs the torch build that fits this machine into the environment of $PY (make setup).
#
#   TORCH=auto  cuda where `nvidia-smi -L` runs, cpu elsewhere (the default)
#   TORCH=cuda  keep a CUDA torch already there; else torch==$TORCH_VERSION from the default
#               index (PyPI's Linux wheels are the CUDA builds), never a +cpu wheel
#   TORCH=cpu   torch==$TORCH_VERSION+cpu on Linux: a local wheel if pip's find-links has one
#               (no network), else PyTorch's CPU index; elsewhere PyPI's torch, a CPU build
#   TORCH=keep  nothing: whatever torch is there stays (with none, the package's own
#               requirement, torch>=2.4, brings pip's default)
#
# DRY_RUN=1 prints the choice and the pip commands without running them.
set -eu
: "${PY:?PY must name the environment's python}" "${TORCH_VERSION:?TORCH_VERSION must be set}"
TORCH=${TORCH:-auto}
CPU_INDEX=${CPU_INDEX:-https://download.pytorch.org/whl/cpu}

run() {
    echo "+ $*"
    [ -n "${DRY_RUN:-}" ] || "$@"
}

local_cpu_wheel() {  # does pip's find-links hold torch==$TORCH_VERSION+cpu? (no network)
    "$PY" -m pip install -q --dry-run --no-index --no-deps "torch==$TORCH_VERSION+cpu" \
        >/dev/null 2>&1
}

case $TORCH in
    auto) if nvidia-smi -L >/dev/null 2>&1; then build=cuda; else build=cpu; fi ;;
    cpu | cuda | keep) build=$TORCH ;;
    *) echo "TORCH must be auto, cpu, cuda or keep, not '$TORCH'" >&2; exit 2 ;;
esac
probe='import torch; print(torch.__version__, "cuda" if torch.version.cuda else "cpu")'
installed=$("$PY" -c "$probe" 2>/dev/null || true)  # "2.13.0+cpu cpu", "2.13.0 cuda" or empty
echo "torch: TORCH=$TORCH chooses $build (installed: ${installed:-none})"

case $build in
    cuda)
        case $installed in
            *" cuda") echo "torch: keeping the CUDA torch already installed" ;;
            *) run "$PY" -m pip install -q "torch==$TORCH_VERSION,!=$TORCH_VERSION+cpu" ;;
        esac ;;
    cpu)
        case $installed in
            "$TORCH_VERSION+cpu cpu" | "$TORCH_VERSION cpu")
                echo "torch: the CPU build of $TORCH_VERSION is already installed"
                exit 0 ;;
        esac
        if [ "$(uname -s)" != Linux ]; then  # PyPI's torch for macOS and Windows is CPU-only
            run "$PY" -m pip install -q "torch==$TORCH_VERSION"
        elif local_cpu_wheel; then
            run "$PY" -m pip install -q --no-index --no-deps "torch==$TORCH_VERSION+cpu"
            run "$PY" -m pip install -q "torch==$TORCH_VERSION+cpu"  # its dependencies
        else
            run "$PY" -m pip install -q "torch==$TORCH_VERSION+cpu" --index-url "$CPU_INDEX"
        fi ;;
    keep) ;;
esac
