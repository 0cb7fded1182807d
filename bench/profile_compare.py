"""Op-by-op comparison of two PyTorch profiler Chrome traces (`pirclip train --profile` and
bench/pir_train_step.py --profile): self time per op name (an op's time minus that of the ops nested in
it on the same thread), summed over the trace and divided by the number of profiled steps, largest
differences first.   profile_compare.py A.json B.json [STEPS=3] [ROWS=30]"""
import collections, json, sys


def self_times(path):
    events = [e for e in json.load(open(path))["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[e["tid"]].append(e)
    totals, counts = collections.Counter(), collections.Counter()
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []  # [end, name, child time]
        def close(upto):
            while stack and stack[-1][0] <= upto:
                end, name, children, dur = stack.pop()
                totals[name] += dur - children
                if stack:
                    stack[-1][2] += dur
        for e in evs:
            close(e["ts"])
            stack.append([e["ts"] + e["dur"], e["name"], 0.0, e["dur"]])
            counts[e["name"]] += 1
        close(float("inf"))
    return totals, counts


a_path, b_path = sys.argv[1], sys.argv[2]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
rows = int(sys.argv[4]) if len(sys.argv) > 4 else 30
(a, ac), (b, bc) = self_times(a_path), self_times(b_path)
print(f"self time per step, ms   A = {a_path}   B = {b_path}")
print(f"{'op':44} {'A ms':>9} {'B ms':>9} {'A-B':>9} {'A n':>6} {'B n':>6}")
for name in sorted(set(a) | set(b), key=lambda n: -abs(a[n] - b[n]))[:rows]:
    print(f"{name[:44]:44} {a[name] / 1e3 / steps:9.1f} {b[name] / 1e3 / steps:9.1f} {(a[name] - b[name]) / 1e3 / steps:9.1f} "
          f"{ac[name] // steps:6d} {bc[name] // steps:6d}")
print(f"{'total':44} {sum(a.values()) / 1e3 / steps:9.1f} {sum(b.values()) / 1e3 / steps:9.1f} {(sum(a.values()) - sum(b.values())) / 1e3 / steps:9.1f}")
