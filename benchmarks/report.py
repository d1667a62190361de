"""Markdown tables from a results JSON (``python -m benchmarks --report results.json``)."""

from __future__ import annotations


def _f(x, nd=2):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def ingest_table(r: dict) -> str:
    out = [f"**Result ingest**, {r['lines']:,} lines of {r['dim']}-d classic-model output "
           f"({r['bytes'] / 2**20:,.0f} MiB JSONL) → READY rows:", "",
           "| method | seconds | rows/s | × limit | × executemany | peak RSS MiB | vectors = limit's (same storage) |",
           "|---|---:|---:|---:|---:|---:|:---:|"]
    for m in r["methods"]:
        out.append(f"| {m['label']} | {_f(m['seconds'])} | {m['rows_per_s']:,.0f} | {_f(m['x_limit'])} | "
                   f"{_f(m['x_executemany'])} | {_f(m['rss_mib'], 0)} | { {True: 'yes', False: 'NO', None: '(fp16)'}[m['vectors_match_limit']] } |")
    sizes = [f"{m['label']}: {m['table_mib']:,.0f} MiB" for m in r["methods"] if m.get("table_mib")]
    if sizes:
        out += ["", "Vector table size after the COPY (heap + TOAST + indexes): " + "; ".join(sizes) + "."]
    if r.get("rss"):
        b = r["rss"]
        small = next(m for m in r["methods"] if m["label"].startswith("project (local disk)"))
        out += ["", f"Peak RSS of the project path (local disk, 1 task): {small['rss_mib']:,.0f} MiB at {r['lines']:,} lines, "
                    f"{b['rss_mib']:,.0f} MiB at {b['lines']:,} lines ({b['bytes'] / 2**30:,.1f} GiB JSONL, "
                    f"{b['seconds']:,.0f} s, {b['rows_per_s']:,.0f} rows/s, {b['ready']:,} READY)."]
    return "\n".join(out)


def encode_table(r: dict) -> str:
    dev = r["device"]
    gpu = next((m.get("gpu") for m in r["methods"] if m.get("gpu")), None)
    out = [f"**Local encoding** on {gpu or dev}, {r['texts']:,} texts (Russian + English, 40–1,200 chars, "
           f"{r['tokens']:,} tokens), MiniLM-L6, batch {r['batch_size']}:", "",
           "| method | seconds | texts/s | × plain encode() | max abs diff vs plain | peak RSS MiB |",
           "|---|---:|---:|---:|---:|---:|"]
    for m in r["methods"]:
        diff = m.get("max_abs_diff_vs_plain")
        out.append(f"| {m['label']} | {_f(m['seconds'])} | {_f(m['texts_per_s'], 1)} | {_f(m['x_plain'])} | "
                   f"{'–' if diff is None else f'{diff:.1e}'} | {_f(m['rss_mib'], 0)} |")
    if r.get("halfvec_recall_at_10") is not None:
        out += ["", f"halfvec trade-off on these real vectors: exact cosine top-10 over half-float copies finds "
                    f"**{r['halfvec_recall_at_10']:.2%}** of the float32 top-10 (every text a query)."]
    return "\n".join(out)


def incremental_table(r: dict) -> str:
    runs = r["runs"]
    out = [f"**Incremental**, {r['docs']:,} documents → {runs['full']['chunks']:,} chunks (local backend, "
           "HNSW index):", "",
           "| run | seconds | chunk_corpus s | encode+load s | finish_batch s | texts encoded | chunks reused |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    names = {"full": "1. full (stub encoder: random unit vectors)", "unchanged": "2. unchanged corpus (real encoder)",
             "edited": f"3. {runs['edited'].get('edited_documents', 0):,} documents edited (real encoder)"}
    for key in ("full", "unchanged", "edited"):
        x = runs[key]
        st = x["stages"]
        out.append(f"| {names[key]} | {_f(x['seconds'])} | {_f(st['chunk_corpus'])} | {_f(st['encode_partitions'])} | "
                   f"{_f(st['finish_batch'])} | {x['encoded_texts']:,} | {_f(x['reused'])} |")
    out += ["", f"Unchanged run / full run: **{r['unchanged_vs_full_stub']:.1%}** of the stub-encoder full run; "
                f"**{r['unchanged_vs_full_real_estimate']:.2%}** of a real full run estimated at "
                f"{r['full_real_estimate_s']:,.0f} s (the stub's encode time replaced by "
                f"{runs['full']['encoded_texts']:,} texts at {r['real_encode_rate']:,.1f} texts/s, "
                f"{r.get('rate_source', 'the real encoder in run 3')})."]
    return "\n".join(out)


def airflow_table(r: dict) -> str:
    out = [f"**Airflow overhead**, `reindex_corpus` through `dag.test()`, {r['docs']:,} documents → "
           f"{r['chunks']:,} chunks, local backend, {r['encoder']} encoder:", "",
           "| wall s | Σ task durations s | overhead s | overhead / wall | task instances |",
           "|---:|---:|---:|---:|---:|",
           f"| {_f(r['wall_s'])} | {_f(r['task_seconds'])} | {_f(r['overhead_s'])} | {r['overhead_fraction']:.1%} | "
           f"{r['task_instances']} |", "",
           "Task durations: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["by_task"].items() if v) + "."]
    parse = r.get("parse")
    if parse:
        out += ["", f"Parsing the DAG folder ({parse['dags']} DAGs, {parse['errors']} import errors) takes "
                    f"{parse['seconds']:.2f} s in a fresh interpreter, {parse['ratio']}× a one-DAG baseline folder "
                    f"({parse['baseline_seconds']:.2f} s): nothing heavy is imported at parse time."]
    est = r.get("real_encoder_estimate")
    if est:
        out += ["", f"With the real encoder the task work grows by the encode time ({r['chunks']:,} chunks at "
                    f"{est['encode_rate']:,.1f} texts/s, the encode benchmark's rate), the overhead does not: "
                    f"≈ {est['wall_s']:,.0f} s wall, overhead **{est['overhead_fraction']:.1%}**."]
    return "\n".join(out)


def service_table(r: dict) -> str:
    out = [f"**Remote embedding service** (`backend=\"service\"`, {r['protocol']} protocol), {r['texts']:,} texts "
           f"(Russian + English, 40–1,200 chars, {r['tokens']:,} tokens), {r['model']} in both; the reference service "
           f"in its own process, cache off, {r['batch_size']} texts a request; torch threads "
           f"{r['torch_threads']} (`OMP_NUM_THREADS={r['threads']}` in the service and the local baseline):", "",
           "| method | seconds | texts/s | × local encode | requests | client CPU s | service CPU s | "
           "overhead share | max abs diff vs local |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in r["methods"]:
        diff, share = m.get("max_abs_diff_vs_local"), m.get("overhead_share")
        out.append(f"| {m['label']} | {_f(m['seconds'])} | {_f(m['texts_per_s'], 1)} | {_f(m['x_local'])} | "
                   f"{_f(m.get('requests'))} | {_f(m['cpu_s'])} | {_f(m.get('service_cpu_s'))} | "
                   f"{'–' if share is None else f'{share:.1%}'} | {'–' if diff is None else f'{diff:.1e}'} |")
    top = max(r["concurrency"])
    out += ["", f"Client overhead: the noop service (no encoding) at concurrency {top} takes "
                f"**{r['overhead_share']:.1%}** of the model-backed service run's wall time at the same concurrency."]
    if r.get("padded_tokens_local"):
        out += ["", f"Padding: the service token-sorts each request's {r['batch_size']} texts apart, the local encoder "
                    f"all {r['texts']:,} at once: the forward passes carry {r['padded_tokens_per_request']:,} padded "
                    f"tokens through the service against {r['padded_tokens_local']:,} locally "
                    f"({r['padded_tokens_per_request'] / r['padded_tokens_local']:.2f} ×)."]
    return "\n".join(out)


def scan_table(r: dict) -> str:
    from benchmarks.scan import sharded_table

    runs = r["runs"]
    full = runs.get("full")
    if full is None:  # the single-task runs were left out (--scan-no-single): floors, sharded runs, GCS sample
        floors = "; ".join(f"{x['label']}: {_f(x['seconds'])} s" for k in ("walk", "read") if (x := runs.get(k)))
        gcs = "; ".join(f"{x['label']} (one task): {_f(x['seconds'])} s" for k in ("gcs_full", "gcs_unchanged")
                        if (x := runs.get(k)))
        return "\n".join([sharded_table(r), "", f"Floors, no store: {floors}." + (f" {gcs}." if gcs else "")])
    out = [f"**Corpus scan** (the `chunk_corpus` task, one task; `prepare` in its own process before it), "
           f"{r['docs']:,} documents, one `.txt` file each ({r['chars'][0]:,}–{r['chars'][1]:,} characters, "
           f"{r['bytes'] / 2**20:,.0f} MiB, {r['per_folder']:,} files a folder) → {full['chunks']:,} chunks "
           f"({r['chunks_per_document']} a document), local disk (page cache), the local backend's tokenizer:", "",
           "| run | scan s | documents/s | chunks/s | × full scan | files read | files unchanged | chunks to embed "
           "| scan CPU s | in SQL s | scan peak RSS MiB | prepare s | load before |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key in ("walk", "read", "full", "unchanged", "edited", "gcs_full", "gcs_unchanged"):
        x = runs.get(key)
        if not x:
            continue
        ratio = "–" if x.get("x_full") is None else f"{x['x_full']:.1%}"
        out.append(f"| {x['label']} | {_f(x['seconds'])} | {_f(x.get('documents_per_s'), 0)} | "
                   f"{_f(x.get('chunks_per_s'), 0)} | {ratio} | {_f(x.get('read_files'))} | "
                   f"{_f(x.get('unchanged_files'))} | {_f(x.get('pending'))} | {_f(x.get('client_cpu_s'))} | "
                   f"{_f(x.get('statements_s'))} | {_f(x['rss_mib'], 0)} | {_f(x.get('prepare_s'))} | "
                   f"{_f(x['load_before'])} |")
    names = {"unchanged": "row 2", "edited": "row 3", "gcs_unchanged": "row 5"}
    totals = ", ".join(f"{name} {runs[k]['x_full_total']:.1%}" for k, name in names.items()
                       if runs.get(k, {}).get("x_full_total") is not None)
    notes = ["", "× full scan: rows 2 and 3 against row 1, row 5 against row 4 (the same GCS sample); with the "
                 f"`prepare` task's seconds added to both sides: {totals}. \"chunks to embed\": the chunks the scan "
                 "left PENDING for the encode stage (before rows 2 and 5 every chunk got a stub vector, "
                 f"{r['fill_seconds']:,.0f} s, not timed: a nightly run follows one that embedded everything). "
                 "The walk and read rows use no store: the floors of the unchanged and of the full scan. \"in SQL\": "
                 "the scan's time inside statements (each `execute` round trip and `COPY` block; commits not counted) "
                 "— what is neither that nor the scan's CPU is mostly waiting for a core (load). \"load "
                 f"before\": the 1-minute load average ({r.get('load_at_start', ['?'])[0]} when the section started, "
                 f"{r.get('load_at_end', ['?'])[0]} at its end)."]
    for key in ("unchanged", "full"):
        top = runs[key].get("top_statements")
        if top:
            where = "; ".join(f"{t['seconds']:,.2f} s in {t['calls']:,} × `{t['statement'][:60]}…`" for t in top[:5])
            notes += ["", f"Where the {key} scan's {runs[key]['statements_s']:,.2f} s in SQL go (top 5 of "
                          f"{runs[key]['statements']:,} statements): {where}."]
    ex = r.get("extrapolated")
    if ex:
        cells = "; ".join(f"{int(n):,} documents: full ≈ {v['full_s']:,} s, unchanged ≈ {v['unchanged_s']:,} s, "
                          f"{r['edit_fraction']:.0%} edited ≈ {v['edited_s']:,} s" for n, v in ex.items())
        notes += ["", f"**Extrapolation** (linear in the documents from the scan seconds above, not measured), one "
                      f"scan task on this machine: {cells}."]
    if r.get("sharded"):
        notes += ["", sharded_table(r)]
    return "\n".join(out + notes)


def runtimes_table(r: dict) -> str:
    from benchmarks.runtimes import table

    return table(r)


def render(results: dict) -> str:
    parts = [f"Run {results['date']} on {results['machine_line']}; command: `{results['command']}`."]
    for key, fn in (("ingest", ingest_table), ("encode", encode_table), ("incremental", incremental_table),
                    ("airflow", airflow_table), ("service", service_table), ("scan", scan_table),
                    ("runtimes", runtimes_table)):
        if results.get(key):
            section = fn(results[key])
            cmd = results[key].get("command")
            if cmd and cmd != results["command"]:
                section += f"\n\n(made by `{cmd}` on {results[key].get('date')})"
            parts.append(section)
    return "\n\n".join(parts) + "\n"
