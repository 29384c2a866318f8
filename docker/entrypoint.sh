#!/usr/bin/env bash
# d2ct container entry point: runs a d2ct tool by name, or a shell / Python.
#
#   d2ct TOOL [ARGS...]      python $D2CT_TOOLS/TOOL.py ARGS...   (train_net, run_pipeline, pseudolabel, ...)
#                            (tools/TOOL.py is a shim of a d2ct module's main; the same commands are
#                            on PATH as console scripts: d2ct-train, d2ct-pipeline, d2ct-pseudolabel, ...)
#   d2ct bash [ARGS...]      a shell (also: sh)
#   d2ct python [ARGS...]    the environment's Python (also: python3)
#   d2ct pytest [ARGS...]    python -m pytest (the project's tests)
#   d2ct help                this message and the list of tools (also: no argument, -h, --help)
#
# TOOL may also be written train-net, train_net.py or tools/train_net.py.
# Settings (environment variables), so the script also runs outside the image:
#   D2CT_HOME     project folder (default /opt/d2ct in the image)
#   D2CT_TOOLS    folder of the tool scripts (default $D2CT_HOME/tools)
#   D2CT_PYTHON   Python interpreter (default: python3 on PATH)
# Exit status: the tool's own; 2 for an unknown command; 0 for help.
set -euo pipefail

D2CT_HOME="${D2CT_HOME:-/opt/d2ct}"
D2CT_TOOLS="${D2CT_TOOLS:-$D2CT_HOME/tools}"
D2CT_PYTHON="${D2CT_PYTHON:-python3}"

list_tools() {
    local f name summary
    for f in "$D2CT_TOOLS"/*.py; do
        [ -e "$f" ] || continue
        name="$(basename "$f" .py)"
        case "$name" in _*) continue ;; esac
        # first line of the module docstring
        summary="$(sed -n '/"""/{s/^[^"]*"""//;s/""".*$//;p;q;}' "$f")"
        if [ "${#summary}" -gt 72 ]; then summary="${summary:0:69}..."; fi
        printf '  %-18s %s\n' "$name" "$summary"
    done
}

usage() {
    cat <<EOF
d2ct container: run a d2ct tool, a shell or Python.

usage: d2ct TOOL [ARGS...]      e.g. d2ct train_net --config configs/scratch/radiologist_r50.yaml
       d2ct bash | sh           a shell
       d2ct python [ARGS...]    Python with torch, Detectron2 and d2ct
       d2ct pytest [ARGS...]    the test suite (e.g. d2ct pytest -m "not slow")
       d2ct help                this message

tools ($D2CT_TOOLS), each with --help:
$(list_tools)

The same commands are on PATH as d2ct-train, d2ct-pipeline, d2ct-predict, ... (d2ct bash).
Folders: data in /data (datasets/ points there), results in /output (output/ points there).
EOF
}

if [ "$#" -eq 0 ]; then
    usage
    exit 0
fi

cmd="$1"
shift

case "$cmd" in
    help | -h | --help)
        usage
        exit 0
        ;;
    bash | sh)
        exec "$cmd" "$@"
        ;;
    python | python3)
        exec "$D2CT_PYTHON" "$@"
        ;;
    pytest)
        exec "$D2CT_PYTHON" -m pytest "$@"
        ;;
esac

# a tool: accept train_net, train-net, train_net.py and tools/train_net.py
name="${cmd##*/}"
name="${name%.py}"
name="${name//-/_}"
if [[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9_]*$ ]] && [ -f "$D2CT_TOOLS/$name.py" ]; then
    exec "$D2CT_PYTHON" "$D2CT_TOOLS/$name.py" "$@"
fi

{
    echo "d2ct: unknown command '$cmd'"
    echo
    usage
} >&2
exit 2
