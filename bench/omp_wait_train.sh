#!/bin/bash
# train round 14 of a copy of demo40, default OpenMP waiting vs passive; wall from timings.jsonl
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)"
cd "${WORK:-.}"  # where toy-assets/ and ab/A, ab/B (copies of a run directory with rounds 12-14) are
for v in A B A2 B2; do
  d=ab/${v:0:1}; rm -rf $d/round-0014/train $d/round-0014/student $d/round-0014/timings.jsonl
  t=$(date +%s.%N)
  if [ ${v:0:1} = B ]; then OMP_WAIT_POLICY=PASSIVE eopd-pipe train $d --round 14 >/dev/null 2>&1; else eopd-pipe train $d --round 14 >/dev/null 2>&1; fi
  echo "$v exit $? total $(echo "$(date +%s.%N) - $t" | bc) s; $(cat $d/round-0014/timings.jsonl); sha $(sha256sum $d/round-0014/student/model.safetensors | cut -c1-16); load $(cut -d' ' -f1 /proc/loadavg)"
done
