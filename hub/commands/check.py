"""`beamhub check --enclave X [beamhub.yaml]`: what a deployment must change to run in enclave X."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "check", help="compare a deployment with an enclave's requirements (exit 0 if all pass)"
    )
    parser.add_argument(
        "--enclave", required=True, help="target enclave: dev, open, moderate, leadership"
    )
    parser.add_argument(
        "deployment",
        nargs="?",
        default=None,
        help="beamhub.yaml to check (default: the embedded defaults)",
    )
    parser.add_argument("--json", action="store_true", help="print the requirements as JSON")
    parser.add_argument(
        "--no-probe",
        action="store_true",
        help="read the configuration only; by default the running `beamhub up` is also probed "
        "(a member's code reading secrets, a channel without its credential, a revoked token)",
    )
    parser.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from beamhub.hub.enclave import EnclaveError, check_deployment, load_profile
    from beamhub.hub.up.deployment import DeploymentError, load_deployment

    try:
        target = load_profile(args.enclave)
        dep = load_deployment(args.deployment)
    except (EnclaveError, DeploymentError) as exc:
        print(f"beamhub check: {exc}", file=sys.stderr)
        return 2
    base = Path(args.deployment).resolve().parent if args.deployment else None
    results = check_deployment(dep, target, base)
    probed = "not asked (--no-probe)"
    if not args.no_probe:
        from beamhub.auth.home import state_dir
        from beamhub.hub.probes import ProbeUnavailable, run_probes

        state = Path(dep.state_dir).expanduser() if dep.state_dir else state_dir()
        try:
            results += run_probes(state, dep, target)
            probed = f"the `beamhub up` on {state}"
        except ProbeUnavailable as exc:
            probed = f"nothing: {exc}"
    failed = [r for r in results if not r.ok]
    if args.json:
        print(
            json.dumps(
                {
                    "enclave": target.name,
                    "deployment": dep.source,
                    "ok": not failed,
                    "probed": probed,
                    "requirements": [r.__dict__ for r in results],
                },
                indent=2,
            )
        )
        return 0 if not failed else 1
    print(f"enclave {target.name}: {target.description}")
    print(f"deployment: {dep.source} (enclave {dep.enclave})")
    print(f"probed: {probed}\n")
    width = max(len(r.name) for r in results)
    for r in results:
        mark = "PASS" if r.ok else "FAIL"
        print(f"  {mark}  {r.name:<{width}}  required: {r.required}; actual: {r.actual}")
        if not r.ok:
            print(f"        {'':<{width}}  → {r.fix}")
    print()
    if failed:
        print(
            f"{len(failed)} of {len(results)} requirements fail: "
            f"{', '.join(r.name for r in failed)}"
        )
        return 1
    print(f"all {len(results)} requirements pass: ready for enclave {target.name}")
    return 0
