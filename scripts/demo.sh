#!/usr/bin/env bash
# The demo pipeline on the built-in corpus (docstrings of Python's standard library).
# Every step's record is kept under runs/demo/. Run through `make demo`.
set -euo pipefail
ITERA=${ITERA:-.venv/bin/itera}
RUNS=${RUNS:-runs/demo}
REG=(--registry "$RUNS/registry.db")
# The demo owns $RUNS: every run starts from an empty one (itera itself never replaces an output
# without --force).
rm -rf "$RUNS"
mkdir -p "$RUNS"

echo "== 1. train the demo teacher from scratch (no teacher, plain cross-entropy)" >&2
$ITERA distill --alpha 0 --tokenizer bpe:4096 --student configs/students/demo-teacher.yaml \
    --data pydocs@train --out "$RUNS/teacher" --steps 300 --lr 3e-3 --warmup-steps 20 \
    --batch-size 16 --seq-len 128 --metrics-out "$RUNS/teacher.json" > /dev/null

echo "== 2. distill a quarter-size student | GPTQ 4-bit | GGUF Q4_0 | evaluate in llama.cpp | benchmark | register" >&2
$ITERA distill --teacher "$RUNS/teacher" --student quarter --data pydocs@train --out "$RUNS/student" \
    --steps 150 --lr 2e-3 --batch-size 16 --seq-len 128 --metrics-out "$RUNS/student.json" \
  | $ITERA quantize --method gptq --bits 4 --group-size 32 --calib pydocs@test --out "$RUNS/student-q4" \
      --metrics-out "$RUNS/student-q4.json" \
  | $ITERA export --format gguf --gguf-type Q4_0 --out "$RUNS/student-q4.gguf" --metrics-out "$RUNS/student-export.json" \
  | $ITERA evaluate --dataset pydocs@test --max-tokens 20000 --metrics-out "$RUNS/student-eval.json" \
  | $ITERA benchmark-power --metrics-out "$RUNS/student-power.json" \
  | $ITERA registry register --name pydocs-demo --tag role=student "${REG[@]}" > "$RUNS/student-register.json"

echo "== 3. the teacher as GGUF F16: evaluate, benchmark, register" >&2
$ITERA export --model "$RUNS/teacher" --format gguf --gguf-type F16 --out "$RUNS/teacher-f16.gguf" \
    --metrics-out "$RUNS/teacher-export.json" \
  | $ITERA evaluate --dataset pydocs@test --max-tokens 20000 --metrics-out "$RUNS/teacher-eval.json" \
  | $ITERA benchmark-power --metrics-out "$RUNS/teacher-power.json" \
  | $ITERA registry register --name pydocs-demo --tag role=teacher "${REG[@]}" > "$RUNS/teacher-register.json"

echo "== 4. activate the teacher, mark it good, try to promote the student on perplexity" >&2
$ITERA registry activate pydocs-demo@2 "${REG[@]}" > /dev/null
$ITERA registry mark-good pydocs-demo@2 "${REG[@]}" > /dev/null
if $ITERA registry promote pydocs-demo@1 --metric perplexity --max-regression 25% "${REG[@]}" > "$RUNS/promote.json"; then
  echo "   student promoted" >&2
else
  echo "   promotion refused (exit $?): the gate kept the teacher live" >&2
fi
$ITERA registry rollback pydocs-demo "${REG[@]}" > "$RUNS/rollback.json"
$ITERA registry compare pydocs-demo@1 pydocs-demo@2 "${REG[@]}" > "$RUNS/compare.json"
echo "active model: $($ITERA registry resolve pydocs-demo@active "${REG[@]}")" >&2


echo "== 5. report" >&2
$ITERA report "$RUNS/student-register.json" "$RUNS/teacher-register.json" --out "$RUNS/report" \
    --metrics-out "$RUNS/report.json" > /dev/null
$ITERA report "$RUNS/student-register.json" "$RUNS/teacher-register.json" --out "$RUNS/report-html" --format html > /dev/null
echo "report: $RUNS/report/report.md; records under $RUNS/" >&2
