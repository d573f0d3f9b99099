"""``tracin-tasks relabel``: the reviewer's side of the relabel queue, and corrections back to MLflow."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tracin_tasks._text import for_terminal, write_csv


def add_relabel_commands(sub: Any) -> None:
    relabel = sub.add_parser("relabel", help="work the relabel queue and apply corrections back to MLflow",
                             description="The reviewer's side of the relabel queue, and corrections back.")
    rsub = relabel.add_subparsers(dest="relabel_command", required=True)

    def queue_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--queue", required=required, metavar="URI",
                       help="the queue: sqlite:///queue.db or postgresql+psycopg://... (?table=NAME to pick a table)")

    ls = rsub.add_parser("list", help="show queued rows, most suspicious first")
    queue_arg(ls)
    ls.add_argument("--run-id", default=None, help="only rows flagged in audits of this training run")
    ls.add_argument("--fingerprint", default=None, help="only rows of this data version")
    ls.add_argument("--status", action="append", default=None,
                    choices=["pending", "in_review", "relabeled", "confirmed", "skipped"])
    ls.add_argument("--limit", type=int, default=50, help="at most this many rows (default 50; 0 = all)")
    ls.add_argument("--format", choices=["table", "csv", "json"], default="table")

    claim = rsub.add_parser("claim", help="take pending rows for review (never the same row as another worker)")
    queue_arg(claim)
    claim.add_argument("--worker", required=True, help="who reviews them")
    claim.add_argument("-n", type=int, default=10, help="how many rows (default 10)")
    claim.add_argument("--run-id", default=None)
    claim.add_argument("--fingerprint", default=None)

    decide = rsub.add_parser("decide", help="record a decision about one row")
    queue_arg(decide)
    decide.add_argument("--row-id", required=True)
    decide.add_argument("--run-id", default=None, help="the training run (finds the data version)")
    decide.add_argument("--fingerprint", default=None, help="the data version, when the run has several")
    what = decide.add_mutually_exclusive_group(required=True)
    what.add_argument("--label", type=int, help="the correct label (relabeled)")
    what.add_argument("--confirm", action="store_true", help="the given label is right")
    what.add_argument("--skip", action="store_true", help="cannot tell; leave the row as it is")
    decide.add_argument("--by", default=None, help="who decided")
    decide.add_argument("--note", default=None)

    release = rsub.add_parser("release", help="put claimed rows back to pending")
    queue_arg(release)
    release.add_argument("--worker", default=None, help="only this worker's rows (default: all claimed rows)")

    apply = rsub.add_parser("apply", help="write corrected training data from the decisions and log it to MLflow")
    queue_arg(apply)
    apply.add_argument("--run-id", required=True, help="the audited training run")
    apply.add_argument("--tracking-uri", default=None)
    apply.add_argument("--output", default=None, help="folder for the corrected data (default tracin-relabel/RUN_ID)")
    apply.add_argument("--no-mlflow", action="store_true", help="only write the files")
    apply.add_argument("--mlflow-secret-block", default=None, metavar="NAME",
                       help="Prefect Secret block holding the tracking server's password")

    flush = rsub.add_parser("flush", help="deliver rows waiting in an outbox")
    flush.add_argument("--outbox", required=True)
    flush.add_argument("--sink", action="append", required=True, metavar="URI", help="the sink they wait for")


def _sql_queue(uri: str):
    from tracin_tasks.exceptions import ConfigurationError
    from tracin_tasks._uris import redact
    from tracin_tasks.integrations.relabel.registry import open_sink
    from tracin_tasks.integrations.relabel.sql_queue import SqlQueue

    sink = open_sink(uri, create=False) if not uri.startswith(("file:", "labelstudio:")) else None
    if not isinstance(sink, SqlQueue):
        raise ConfigurationError(
            f"{redact(uri)} is not a SQL queue; work a Label Studio project in Label Studio and a file drop with "
            "your own tools (write decisions_<fingerprint>.csv next to the flagged file)."
        )
    return sink


def _fingerprint_of(queue, run_id: str | None, fingerprint: str | None) -> str | None:
    from tracin_tasks.exceptions import ConfigurationError

    if fingerprint or not run_id:
        return fingerprint
    rows = queue.rows(run_id=run_id)
    found = sorted(set(rows["fingerprint"])) if len(rows) else []
    if not found:
        raise ConfigurationError(f"The queue has no rows of run {run_id}.")
    if len(found) > 1:
        raise ConfigurationError(f"Run {run_id} has rows of {len(found)} data versions in the queue "
                                 f"({', '.join(f[:12] for f in found)}); pass --fingerprint.")
    return found[0]


def run_relabel(args: argparse.Namespace) -> int:
    cmd = args.relabel_command
    if cmd == "apply":
        from tracin_tasks.orchestration.flows import apply_relabels

        from tracin_tasks._uris import refuse_uri_credentials
        from tracin_tasks.orchestration.relabel import check_sinks

        refuse_uri_credentials(args.tracking_uri, "--tracking-uri")  # before Prefect stores the parameters
        check_sinks(args.queue)
        result = apply_relabels(run_id=args.run_id, queue=args.queue, tracking_uri=args.tracking_uri,
                                output_dir=args.output, log_to_mlflow=not args.no_mlflow,
                                mlflow_secret_block=args.mlflow_secret_block)
        print(f"run {result['run_id']}: {result['changed']} labels corrected, {result['confirmed']} confirmed, "
              f"{result['skipped']} skipped (of {result['decisions']} decisions)")
        print(f"corrected training data: {result['files']['training_data.parquet']}")
        print(f"change log: {result['files']['changes.csv']}")
        if result["relabel_run_id"]:
            print(f"MLflow run {result['relabel_run_id']} (child of {result['run_id']}) holds the new dataset; train on "
                  f"it with tracin_tasks.mlflow.load_corrected_training_data({result['run_id']!r})")
        return 0
    if cmd == "flush":
        from tracin_tasks.integrations.relabel.outbox import Outbox
        from tracin_tasks.integrations.relabel.registry import open_sink
        from tracin_tasks.orchestration.sources import prefect_secret

        outbox = Outbox(args.outbox)
        for uri in args.sink:
            sink = open_sink(uri, secrets=prefect_secret)
            try:
                done = outbox.replay(uri, sink)
            finally:
                sink.close()
            print(f"{sink.name}: {len(done)} waiting batches delivered "
                  f"({sum(d.delivered for d in done)} new rows, {sum(d.unchanged for d in done)} already handled)")
        return 0
    queue = _sql_queue(args.queue)
    try:
        if cmd == "list":
            fp = _fingerprint_of(queue, None, args.fingerprint)
            rows = queue.rows(fingerprint=fp, status=args.status, run_id=args.run_id)
            total = len(rows)
            if args.limit:
                rows = rows.head(args.limit)
            cols = ["row_id", "rank", "score", "given_label", "suggested_label", "status", "decided_label",
                    "claimed_by", "decided_by", "run_id", "fingerprint"]
            if args.format == "csv":
                write_csv(rows, sys.stdout)  # no cell a spreadsheet would run as a formula
            elif args.format == "json":
                print(rows.to_json(orient="records", date_format="iso"))
            else:
                view = rows[cols].copy()
                view["fingerprint"] = view["fingerprint"].str[:12]
                for column in ("row_id", "claimed_by", "decided_by", "run_id"):
                    view[column] = view[column].map(lambda v: v if v is None or v != v else for_terminal(v, 40))
                print(view.to_string(index=False) if len(view) else "(no rows)")
                print(f"{len(rows)} of {total} rows; by status: {json.dumps(queue.counts(fp))}")
        elif cmd == "claim":
            fp = _fingerprint_of(queue, args.run_id, args.fingerprint)
            got = queue.claim(args.worker, args.n, fp)
            for r in got:
                print(f"{for_terminal(r['row_id'])}\tgiven {r['given_label']}\tsuggested {r['suggested_label']}\t"
                      f"rank {r['rank']}\tdata {r['fingerprint'][:12]}")
            print(f"{len(got)} rows claimed by {for_terminal(args.worker)}")
        elif cmd == "decide":
            fp = _fingerprint_of(queue, args.run_id, args.fingerprint)
            if fp is None:
                from tracin_tasks.exceptions import ConfigurationError

                raise ConfigurationError("decide needs --run-id or --fingerprint to find the row.")
            status = "confirmed" if args.confirm else "skipped" if args.skip else "relabeled"
            stored = queue.decide(args.row_id, fp, status, args.label, by=args.by, note=args.note)
            print(f"row {for_terminal(args.row_id)}: {stored}" + (f" as {args.label}" if stored == "relabeled" else ""))
        elif cmd == "release":
            print(f"{queue.release(args.worker)} rows back to pending")
    finally:
        queue.close()
    return 0
