"""Operations subcommands of ``defectflow``: ingest, gate, nightly, clean-temp, models list | promote | rollback.

    defectflow ingest [INBOX]            new good videos/images -> source.path (rejects -> quarantine)
    defectflow gate                      register models/model, compare with the champion, promote or reject
    defectflow nightly                   lock, clean, ingest, dvc repro, gate (no Prefect; flows.nightly has one)
    defectflow clean-temp [--min-age M]  remove temps killed runs left (under the nightly lock, dvc idle)
    defectflow models list               every version, its status and metrics (* = champion)
    defectflow models promote VERSION    make VERSION the champion
    defectflow models rollback VERSION   back to an earlier version (one that was champion before)
"""
from __future__ import annotations

from defectflow.config import load_params
from defectflow.errors import DefectflowError


def _registry(params):
    from defectflow.registry.store import Registry

    return Registry(params.registry.path, params.registry.keep)


def _ingest(args) -> int:
    from defectflow.ingest import ingest

    print(ingest(load_params(args.params), args.inbox).summary())
    return 0


def _gate(args) -> int:
    from defectflow.nightly import run_lock
    from defectflow.registry.gate import run_gate

    params = load_params(args.params)
    with run_lock(params.nightly.lock, "defectflow gate"):      # clean-temp must not take its registry copy
        decision = run_gate(params)
    print("model unchanged: nothing to gate" if decision is None else decision.markdown())
    return 0


def _nightly(args) -> int:
    from defectflow.nightly import run_nightly

    result = run_nightly(load_params(args.params))
    print("model unchanged: nothing to gate" if result.decision is None else result.decision.markdown())
    return 0


def _clean_temp(args) -> int:
    from defectflow.cleanup import clean_stale, dvc_idle
    from defectflow.nightly import run_lock

    if args.min_age < 0:
        raise DefectflowError(f"clean-temp --min-age {args.min_age}: give minutes >= 0")
    params = load_params(args.params)
    with run_lock(params.nightly.lock, "defectflow clean-temp"), dvc_idle("."):
        removed, kept = clean_stale(params, ".", min_age_s=args.min_age * 60)
    for p in removed:
        print(f"removed {p}")
    for p in kept:
        print(f"kept {p} (changed in the last {args.min_age:g} min: a stage may be writing it)")
    print(f"{len(removed)} removed, {len(kept)} kept")
    return 0


def _models(args) -> int:
    from defectflow.registry.gate import describe

    reg = _registry(load_params(args.params))
    if args.action == "list":
        if not reg.exists:
            print(f"{reg.root}: no registry yet (the first nightly run or `defectflow gate` creates it)")
            return 0
        versions = reg.list()
        print("   v  status     created                    metrics on the evaluation set, provenance")
        for v in versions:
            print(describe(v))
        print(f"{len(versions)} version(s); champion: {reg.champion_version()}")
        return 0
    if args.version is None:
        raise DefectflowError(f"models {args.action}: give the VERSION (see `defectflow models list`)")
    target = reg.get(args.version)
    champ = reg.champion_version()
    if args.action == "rollback":
        if champ is not None and args.version >= champ:
            raise DefectflowError(f"models rollback {args.version}: the champion is {champ}; roll back to an "
                                  "older version, or use `models promote`")
        if target.status == "rejected":
            raise DefectflowError(f"models rollback {args.version}: that version was rejected by the gate "
                                  f"({'; '.join(target.reasons)}); use `models promote` to override")
    v = reg.promote(args.version, [f"manual {args.action} (champion was {champ})"])
    print(f"champion: version {v.version} (was {champ})")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("ingest", help="new good videos/images from the inbox into the data (rejects quarantined)")
    p.add_argument("inbox", nargs="?", help="default: params.yaml ingest.inbox")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(fn=_ingest)
    p = sub.add_parser("gate", help="register models/model and promote it only if not worse than the champion")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(fn=_gate)
    p = sub.add_parser("nightly", help="one nightly run without Prefect: lock, ingest, dvc repro, gate")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(fn=_nightly)
    p = sub.add_parser("clean-temp", help="remove temp folders killed runs left (takes the nightly lock)")
    p.add_argument("--min-age", type=float, default=10.0,
                   help="keep temps changed in the last MINUTES (a stage run by hand takes no lock; default 10)")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(fn=_clean_temp)
    p = sub.add_parser("models", help="the model registry: list | promote VERSION | rollback VERSION")
    p.add_argument("action", choices=["list", "promote", "rollback"])
    p.add_argument("version", nargs="?", type=int)
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(fn=_models)
