"""Summarise `benches/train-vs-peft.sh`'s outputs as Markdown tables (standard library)."""

import json
import sys
from pathlib import Path


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main() -> None:
    out = Path(sys.argv[1])
    peer = load(out / "peer.json")
    gold = (load(out / "adapter-gold.json") or {}).get("training") or {}
    served = (load(out / "adapter-served.json") or {}).get("training") or {}
    eg = load(out / "eval-gold.json")
    er = load(out / "eval-retrieved.json")
    print("## Training (peer and gold row: same gold-context triplets, hyper-parameters and threads)\n")
    print("| trainer | steps | wall s | s/step | training tokens/s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    if peer:
        print(f"| {peer['engine']} | {peer['steps']} | {peer['train_s']:.0f} | "
              f"{peer['s_per_step']:.2f} | {peer['tokens_per_s']:.0f} | {peer['peak_rss_mib']:.0f} |")
    for label, t in (("domainrag (candle), gold triplets", gold),
                     ("domainrag (candle), retrieved triplets", served)):
        if t:
            steps = max(1, t["steps"])
            train_s = t["wall_s"]
            print(f"| {label} | {t['steps']} | {train_s:.0f} | {train_s / steps:.2f} | "
                  f"{t['tokens_per_s']:.0f} | {t['peak_rss_mib']:.0f} |")
    if peer and gold:
        print(f"\ntraining throughput, domainrag / peer: {gold['tokens_per_s'] / peer['tokens_per_s']:.2f}x")
    print("\n## Answers on held-out articles\n")
    print("| setting | arm | questions | EM | F1 | faithfulness | hallucination | s/answer |")
    print("|---|---|---|---|---|---|---|---|")
    if peer:
        for arm in ("base", "lora"):
            r = peer[arm]
            print(f"| gold context | peer {arm} | {r['questions']} | {r['em']:.1f} | {r['f1']:.1f} | - | - | "
                  f"{r['seconds'] / max(1, r['questions']):.2f} |")
    for setting, report in (("gold context", eg), ("retrieved (full pipeline)", er)):
        if not report:
            continue
        for arm, s in report["arms"].items():
            print(f"| {setting} | domainrag {arm} | {report['questions']} | {100 * s['em']:.1f} | "
                  f"{100 * s['f1']:.1f} | {s['faithfulness']:.3f} | {s['hallucination_rate']:.3f} | "
                  f"{s['seconds_per_answer']:.2f} |")
    print()
    for setting, report in (("gold context", eg), ("full pipeline", er)):
        arms = (report or {}).get("arms", {})
        if "none" in arms:
            for arm, s in arms.items():
                if arm != "none":
                    gain = 100 * (s["f1"] - arms["none"]["f1"])
                    faith = s["faithfulness"] - arms["none"]["faithfulness"]
                    ci = (s.get("vs_base") or {}).get("f1")
                    ci = f" (paired 95% CI {100 * ci[1]['low']:+.1f} to {100 * ci[1]['high']:+.1f})" if ci else ""
                    print(f"{setting}: {arm} F1 {gain:+.1f} over base{ci}, faithfulness {faith:+.3f}")
    if peer and eg and "newwiki-gold" in eg["arms"]:
        gap = 100 * eg["arms"]["newwiki-gold"]["f1"] - peer["lora"]["f1"]
        print(f"gold context: domainrag F1 {gap:+.1f} vs the peer's LoRA")


if __name__ == "__main__":
    main()
