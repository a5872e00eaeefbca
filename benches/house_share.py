#!/usr/bin/env python3
"""How much of an in-domain adapter's F1 gain a general adapter keeps (issue 19's house bar: 80%).

Reads two `domainrag eval answers --json` reports over the same questions: one with the base and
the general adapter (HOUSE.json, arms `none` and `--house`), one with the base and the adapter
trained on the set's own questions (DOMAIN.json, arms `none` and `--domain`). Each gain is taken
against the base of its own run (retrieval or engine changes between the runs move both arms of
a run together). Over the questions both reports answered: each gain with a paired bootstrap 95%
interval, and the share house gain / domain gain with an interval from resampling the questions
(10,000 resamples, fixed seed).

usage: house_share.py HOUSE.json DOMAIN.json [--house house] [--domain newwiki-v3] [--out F.json]
"""

import argparse
import json
import random


def f1_by_id(report, arm):
    return {q["id"]: q["f1"] for q in report["per_question"][arm]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("house")
    p.add_argument("domain")
    p.add_argument("--house-arm", default="house")
    p.add_argument("--domain-arm", default="newwiki-v3")
    p.add_argument("--out")
    a = p.parse_args()
    h, d = json.load(open(a.house)), json.load(open(a.domain))
    hb, ha = f1_by_id(h, "none"), f1_by_id(h, a.house_arm)
    db, da = f1_by_id(d, "none"), f1_by_id(d, a.domain_arm)
    ids = [i for i in ha if i in hb and i in da and i in db]
    house = [ha[i] - hb[i] for i in ids]
    domain = [da[i] - db[i] for i in ids]
    n = len(ids)
    mean = lambda xs: sum(xs) / len(xs)
    rng = random.Random(7)
    boot = {"house": [], "domain": [], "share": []}
    for _ in range(10_000):
        pick = [rng.randrange(n) for _ in range(n)]
        hg, dg = mean([house[k] for k in pick]), mean([domain[k] for k in pick])
        boot["house"].append(hg)
        boot["domain"].append(dg)
        boot["share"].append(hg / dg if dg else float("nan"))
    ci = lambda xs: [sorted(xs)[int(0.025 * 9999)], sorted(xs)[int(0.975 * 9999)]]
    out = {
        "questions": n,
        "base_f1_house_run": mean([hb[i] for i in ids]),
        "house_f1": mean([ha[i] for i in ids]),
        "base_f1_domain_run": mean([db[i] for i in ids]),
        "domain_f1": mean([da[i] for i in ids]),
        "house_gain": mean(house),
        "house_gain_ci95": ci(boot["house"]),
        "domain_gain": mean(domain),
        "domain_gain_ci95": ci(boot["domain"]),
        "share": mean(house) / mean(domain),
        "share_ci95": ci(boot["share"]),
    }
    print(json.dumps(out, indent=2))
    if a.out:
        json.dump(out, open(a.out, "w"), indent=2)


if __name__ == "__main__":
    main()
