#!/usr/bin/env bash
# Facts about the toolchain that built ppap_fast._C and whether a C++ error raised inside the
# extension (TORCH_CHECK) reaches Python as a RuntimeError or kills the process (it segfaulted on
# the device image once: tests/test_guided_update.py::test_bad_inputs, 2026-11-26, H100).
cd "$(dirname "$0")/.."
echo "--- compilers"
for c in "${CXX:-}" /opt/gcc/bin/g++ /usr/bin/g++ "$(command -v g++)" "$(command -v c++)"; do
  [[ -n $c && -x $c ]] && echo "$c: $($c --version | head -1) | libstdc++: $($c -print-file-name=libstdc++.so.6)"
done
for w in /opt/gcc/bin/g++ "$(command -v g++)"; do  # a wrapper script: what it adds
  [[ -f $w ]] && file -b "$w" | grep -q text && { echo "--- $w is a script:"; head -c 1500 "$w"; echo; }
done
python3 - <<'PY'
import re, torch
cfg = torch.__config__.show()
print("torch built with:", "; ".join(sorted(set(re.findall(r"(GCC [\d.]+|clang [\d.]+|C\+\+ Version: \d+|CXX_COMPILER=\S+)", cfg)))))
PY
so=$(ls ppap_fast/_C*.so 2>/dev/null | head -1)
echo "--- $so"
[[ -n $so ]] && ldd "$so" | grep -E "stdc|gcc_s|libc\.so" ; [[ -n $so ]] && strings "$so" | grep -E "^GCC: " | sort -u | head -3
echo "libstdc++ loaded by python+torch: $(python3 -c "import torch; print([l.split()[-1] for l in open('/proc/self/maps') if 'libstdc++' in l][:1])")"
echo "--- C++ error path (a subprocess each)"
cat > /tmp/ext_probe.py <<'PY'
import torch
from ppap_fast import ops
from ppap_fast.ops import update as gu
from ppap_fast.schedule import Schedule
table = gu.build_table(Schedule.create("linear", 1000, "ddim25"), "ddim")
x = torch.randn(2, 3, 4, 4)
try:
    ops.guided_update(x, x, torch.tensor([1, 25]), table, backend="cpp")
    print("no error raised (unexpected)")
except RuntimeError as e:
    print("RuntimeError reached Python:", str(e).splitlines()[0][:120])
PY
python3 /tmp/ext_probe.py; echo "exit status $?"
gcc_lib=$(/opt/gcc/bin/g++ -print-file-name=libstdc++.so.6 2>/dev/null)
if [[ -f $gcc_lib ]]; then
  echo "with LD_PRELOAD=$gcc_lib:"; LD_PRELOAD="$gcc_lib" python3 /tmp/ext_probe.py; echo "exit status $?"
fi
