#!/usr/bin/env bash
# The serving loop on the demo's outputs (run `make demo` first): serve the active model, send
# prompts, post feedback, dpo-train from it, export and register the tuned model, promote it
# through the gate, and watch the running server switch to it.
#
# Works on a copy of the demo's registry ($LOOP/registry.db), so runs/demo stays as the demo left it.
# The simulated user prefers answers in the docstrings' own vocabulary ("return", "value",
# "default", ...): a preference DPO can learn from a few dozen A/B votes.
set -euo pipefail
ITERA=${ITERA:-.venv/bin/itera}
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/demo}
LOOP=${LOOP:-runs/loop}
PORT=${PORT:-0}  # 0: a free port, read back from the server's log
REG=(--registry "$LOOP/registry.db")

for f in "$RUNS/registry.db" "$RUNS/teacher"; do
  [ -e "$f" ] || { echo "loop.sh: $f is missing; run \`make demo\` first" >&2; exit 2; }
done
rm -rf "$LOOP"
mkdir -p "$LOOP"
# sqlite's backup API: a consistent copy even if a WAL file is still beside the original
"$PY" -c "import sqlite3, sys; sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))" \
  "$RUNS/registry.db" "$LOOP/registry.db"

echo "== 1. serve pydocs-demo@active ($($ITERA registry resolve pydocs-demo@active "${REG[@]}"))" >&2
$ITERA serve --model pydocs-demo@active "${REG[@]}" --port "$PORT" --feedback-db "$LOOP/feedback.db" \
  --poll-interval 0.5 > "$LOOP/serve.json" 2> "$LOOP/serve.log" &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
URL=
for _ in $(seq 1 600); do
  URL=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$LOOP/serve.log" | head -n 1 || true)
  [ -n "$URL" ] && curl -sf "$URL/health" > /dev/null 2>&1 && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$LOOP/serve.log" >&2; exit 1; }
  sleep 0.2
done
[ -n "$URL" ] || { echo "loop.sh: the server did not start; see $LOOP/serve.log" >&2; exit 1; }
echo "   /health: $(curl -sf "$URL/health")" >&2

echo "== 2. send prompts (two sampled answers each) and post the simulated user's feedback" >&2
"$PY" - "$URL" > "$LOOP/feedback-summary.json" <<'EOF'
import json, sys, urllib.request

url = sys.argv[1]


def post(path, body):
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


starts = ["Return the", "Raise an error if", "The default", "This function", "Create a new", "If the value",
          "Read the", "Convert the", "Set the", "Check whether the", "Return a list of", "Get the"]
objects = ["file", "string", "object", "value", "path", "module"]
votes = {"ab": 0, "thumbs": 0, "skipped": 0}
for i, start in enumerate(starts):
    for obj in objects:
        prompt = f"{start} {obj}"
        a, b = (post("/v1/completions", {"prompt": prompt, "max_tokens": 24, "temperature": 0.9, "seed": s})
                for s in (2 * i + 1, 2 * i + 2))
        ta, tb = a["choices"][0]["text"], b["choices"][0]["text"]
        sa, sb = (sum(t.lower().count(w) for w in ("return", "value", "default", "none", "true", "false"))
                  for t in (ta, tb))
        if sa != sb:  # the user prefers the answer with more of those words
            post("/v1/feedback", {"type": "ab", "a_id": a["id"], "b_id": b["id"], "winner": "a" if sa > sb else "b"})
            votes["ab"] += 1
        elif ta != tb:  # neither or both: a thumbs-down on the longer one, which dpo-train will count as unusable
            post("/v1/feedback", {"type": "thumbs", "response_id": max((a, b), key=lambda r: len(r["choices"][0]["text"]))["id"],
                                  "vote": "down"})
            votes["thumbs"] += 1
        else:
            votes["skipped"] += 1
print(json.dumps({"served_by": a["system_fingerprint"], "feedback": votes}))
EOF
echo "   $(cat "$LOOP/feedback-summary.json")" >&2

echo "== 3. dpo-train on what the server collected, merge, export GGUF F16, evaluate, register" >&2
$ITERA dpo-train --model "$RUNS/teacher" --feedback-db "$LOOP/feedback.db" --out "$LOOP/dpo" --steps 20 \
    --batch-size 8 --lr 5e-4 --beta 0.5 --holdout 0.2 --merge --metrics-out "$LOOP/dpo.json" > /dev/null
$ITERA export --model "$LOOP/dpo/merged" --format gguf --gguf-type F16 --out "$LOOP/dpo-f16.gguf" \
  | $ITERA evaluate --dataset pydocs@test --max-tokens 20000 \
  | $ITERA registry register --name pydocs-demo --tag role=dpo "${REG[@]}" > "$LOOP/dpo-register.json"
VERSION=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['params']['version'])" "$LOOP/dpo-register.json")
echo "   registered pydocs-demo@$VERSION" >&2

echo "== 4. promote pydocs-demo@$VERSION through the perplexity gate, and watch the server" >&2
if $ITERA registry promote "pydocs-demo@$VERSION" --metric perplexity --max-regression 10% "${REG[@]}" \
    > "$LOOP/promote.json"; then
  for _ in $(seq 1 300); do
    [ "$(curl -sf "$URL/health" | "$PY" -c "import json, sys; print(json.load(sys.stdin)['version'])")" = "$VERSION" ] \
      && break
    sleep 0.2
  done
  echo "   /health: $(curl -sf "$URL/health")" >&2
else
  echo "   promotion refused (exit $?): the server keeps serving $(curl -sf "$URL/health")" >&2
fi
curl -sf "$URL/v1/completions" -H "Content-Type: application/json" \
  -d '{"prompt": "Return the file", "max_tokens": 16, "temperature": 0}' > "$LOOP/after.json"
echo "   next answer from $("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['system_fingerprint'])" \
  "$LOOP/after.json")" >&2

echo "== 5. stop the server (SIGTERM drains it); its record says what it served" >&2
kill -TERM "$SERVER"
wait "$SERVER"
trap - EXIT
"$PY" -c "import json, sys; m = json.load(open(sys.argv[1]))['metrics']; print('   versions served:', \
[(v['version'], v['requests']) for v in m['versions_served']], '| requests', m['requests'], '| errors', m['errors'])" \
  "$LOOP/serve.json" >&2
echo "records and logs under $LOOP/" >&2
