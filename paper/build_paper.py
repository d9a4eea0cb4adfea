"""Build paper.pdf from paper/paper.md and the results files, with fpdf2.

Usage (from the repository root)::

    .venv/bin/python paper/build_paper.py                 # -> paper.pdf; fails if a results file is missing
    .venv/bin/python paper/build_paper.py --allow_missing # draft: marked placeholders for missing results

The source is a small markdown subset (see docs/results.md, section "Paper"): ``# title``, ``## section``,
``### subsection``, paragraphs, ``- `` bullets, ``**bold**`` / ``__italic__`` (fpdf2 markdown), ``{{key}}``
placeholders filled from results/ at build time, and block directives on their own lines::

    ::: table recon            the reconstruction table from results/recon_metrics.csv
    ::: table train_speed      the training-speed table from results/train_speed.csv
    ::: table csv NAME [c1,c2] a small CSV of results_values.CSV_TABLES (heldout_summary, real_scan) as
                               it is: its columns (or those listed), numbers by fmt_number, X and X_std
                               as "X ± std"
    ::: figure recon_figure    results/recon_figure.png (any .png of RESULT_FILES)
    Caption text (tables and figures: the lines up to ':::') ...
    :::
    ::: list settings          generated bullets (settings, ddim_vs_ancestral, uncertainty, heldout)

Files of results_values.OPTIONAL_RESULTS (held-out summary, real scan, prior samples) may be absent: their
blocks and placeholders are then a marked placeholder in every build, and the build prints a note.

Numbers never appear in the source as literals: each one is a placeholder, so the PDF always matches results/.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import List, Optional, Tuple

from fpdf.enums import XPos, YPos

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from paper_pdf import (  # noqa: E402
    PaperPDF,
    body_font,
    render_missing_box,
    render_table_csv,
    render_table_recon,
    render_table_train_speed,
)
from results_values import (  # noqa: E402
    CSV_TABLES,
    GENERATED_SOURCES,
    RESULT_FILES,
    MissingResultsError,
    Results,
    add_generated_text,
    load_results,
)

from improved_diffusion.io_util import atomic_write  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_.\-]+)\s*\}\}")
MISSING_MARK = "[MISSING: {}]"

# Which results file a placeholder key comes from (for the --allow_missing messages).
KEY_SOURCES = (
    ("recon.", "recon_metrics"),
    ("text.", "recon_metrics"),
    ("speed.", "train_speed"),
    ("", "benchmark_info"),
)


class PaperError(ValueError):
    """A problem in the paper source (unknown placeholder, bad directive)."""


def key_source(key: str) -> str:
    """The RESULT_FILES name a placeholder key (or generated list name) is read from."""
    for prefix, name in GENERATED_SOURCES + KEY_SOURCES:
        if key.startswith(prefix):
            return name
    return "benchmark_info"


def substitute(text: str, res: Results, allow_missing: bool, used_missing: List[str]) -> str:
    """Replace ``{{key}}`` placeholders with values from ``res``.

    Args:
        text: source text.
        res: loaded results (``values`` and ``missing``).
        allow_missing: render a marked placeholder when the key's results file is missing, instead of failing
            (for an optional results file always).
        used_missing: appended with each key that was rendered as a placeholder.

    Raises:
        PaperError: for a key that is not in the results (a typo or a results file lacking it).
    """

    def repl(m: re.Match) -> str:
        key = m.group(1)
        if key in res.values:
            return res.values[key]
        if key_source(key) in res.missing_optional:
            return MISSING_MARK.format(key)
        if allow_missing:
            used_missing.append(key)
            return MISSING_MARK.format(key)
        source = key_source(key)
        where = RESULT_FILES[source][0]
        raise PaperError(f"paper source: placeholder '{{{{{key}}}}}' not found in results ({where} lacks it)")

    return PLACEHOLDER.sub(repl, text)


# ----------------------------------------------------------------------------------------------------------
# Source parsing: a list of (kind, payload) blocks.


def parse_source(text: str) -> List[Tuple[str, object]]:
    """Split the markdown subset into blocks: title, h2, h3, para, bullets, table, csv_table, figure, list.

    ``csv_table`` payloads are ``(name, caption, columns)`` (``columns`` empty: all); the others'
    ``(name, caption)``.
    """
    blocks: List[Tuple[str, object]] = []
    lines = text.splitlines()
    i = 0
    para: List[str] = []
    bullets: List[str] = []

    def flush() -> None:
        if para:
            blocks.append(("para", " ".join(s.strip() for s in para)))
            para.clear()
        if bullets:
            blocks.append(("bullets", list(bullets)))
            bullets.clear()

    while i < len(lines):
        line = lines[i].rstrip()
        stripped = line.strip()
        if stripped.startswith("<!--"):
            # comments for authors of the source, possibly over several lines
            while "-->" not in lines[i]:
                i += 1
                if i >= len(lines):
                    raise PaperError("paper source: unterminated <!-- comment")
            i += 1
            continue
        if not stripped:
            flush()
        elif stripped.startswith("::: "):
            flush()
            parts = stripped[4:].split()
            csv_table = len(parts) in (3, 4) and parts[:2] == ["table", "csv"]
            if not csv_table and (len(parts) != 2 or parts[0] not in ("table", "figure", "list")):
                raise PaperError(f"paper source line {i + 1}: bad directive '{stripped}'")
            kind, name = ("csv_table", parts[2]) if csv_table else parts
            columns = parts[3].split(",") if csv_table and len(parts) == 4 else []
            caption: List[str] = []
            if kind in ("table", "csv_table", "figure"):  # caption lines up to a closing ':::'
                i += 1
                while i < len(lines) and lines[i].strip() != ":::":
                    caption.append(lines[i].strip())
                    i += 1
                if i >= len(lines):
                    raise PaperError(f"paper source: {kind} '{name}' caption not closed with ':::'")
            if kind == "csv_table":
                blocks.append((kind, (name, " ".join(caption), columns)))
            else:
                blocks.append((kind, (name, " ".join(caption))))
        elif stripped.startswith("### "):
            flush()
            blocks.append(("h3", stripped[4:]))
        elif stripped.startswith("## "):
            flush()
            blocks.append(("h2", stripped[3:]))
        elif stripped.startswith("# "):
            flush()
            blocks.append(("title", stripped[2:]))
        elif stripped.startswith("- "):
            if para:
                flush()
            bullets.append(stripped[2:])
        elif bullets and line.startswith("  "):
            bullets[-1] += " " + stripped  # continuation of a bullet
        else:
            if bullets:
                flush()
            para.append(stripped)
        i += 1
    flush()
    return blocks


# ----------------------------------------------------------------------------------------------------------
# Rendering.


def render(blocks: List[Tuple[str, object]], res: Results, out_path: str, allow_missing: bool) -> List[str]:
    """Render the parsed blocks into ``out_path`` (written atomically). Returns the placeholder keys used."""
    used_missing: List[str] = []
    title = next((str(p) for k, p in blocks if k == "title"), "Untitled")
    draft = None
    if res.missing:
        files = ", ".join(RESULT_FILES[m][0] for m in res.missing)
        draft = f"DRAFT, NOT REAL RESULTS: missing results files rendered as placeholders ({files})"
    pdf = PaperPDF(short_title=title, draft_note=draft)
    pdf.set_title(title)
    pdf.set_creator("paper/build_paper.py (fpdf2)")
    pdf.add_page()
    body_font(pdf)
    text_width = pdf.w - pdf.l_margin - pdf.r_margin
    fig_no = 0
    tab_no = 0
    in_abstract = False

    def text(s: str) -> str:
        return substitute(s, res, allow_missing, used_missing)

    def table_caption(number: int, caption: str) -> None:
        if pdf.will_page_break(30):
            pdf.add_page()
        pdf.set_font("Serif", "", 8.5)
        pdf.multi_cell(
            0, 4, f"**Table {number}.** " + caption, markdown=True, new_x=XPos.LMARGIN, new_y=YPos.NEXT
        )
        pdf.ln(1)
        body_font(pdf)

    def render_bullets(items: List[str]) -> None:
        for item in items:
            pdf.set_x(pdf.l_margin + 3)
            pdf.cell(4, 4.8, "•")
            pdf.multi_cell(0, 4.8, item, markdown=True, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            pdf.ln(0.6)
        pdf.ln(1.2)

    after_title = False
    for kind, payload in blocks:
        after_title = after_title and kind == "para"
        if kind == "title":
            pdf.set_font("Sans", "B", 16)
            pdf.multi_cell(0, 7.5, text(str(payload)), align="C", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            pdf.ln(2)
            after_title = True
            body_font(pdf)
        elif kind == "h2":
            in_abstract = str(payload).strip().lower() == "abstract"
            pdf.ln(2.5)
            if pdf.will_page_break(20):
                pdf.add_page()
            pdf.set_font("Sans", "B", 12 if not in_abstract else 10)
            align = "C" if in_abstract else "L"
            pdf.multi_cell(0, 6, text(str(payload)), align=align, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            pdf.ln(0.8)
            body_font(pdf)
        elif kind == "h3":
            pdf.ln(1.2)
            if pdf.will_page_break(16):
                pdf.add_page()
            pdf.set_font("Sans", "B", 10)
            pdf.multi_cell(0, 5, text(str(payload)), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            body_font(pdf)
        elif kind == "para":
            if after_title:  # the byline under the title
                pdf.set_font("Sans", "", 9)
                pdf.multi_cell(0, 4.6, text(str(payload)), align="C", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
                body_font(pdf)
                after_title = False
            elif in_abstract:
                pdf.set_font("Serif", "", 9.5)
                pdf.set_x(pdf.l_margin + 8)
                pdf.multi_cell(
                    text_width - 16,
                    4.6,
                    text(str(payload)),
                    markdown=True,
                    new_x=XPos.LMARGIN,
                    new_y=YPos.NEXT,
                )
                body_font(pdf)
            else:
                pdf.multi_cell(0, 4.8, text(str(payload)), markdown=True, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            pdf.ln(1.8)
        elif kind == "bullets":
            render_bullets([text(item) for item in payload])  # type: ignore[union-attr]
        elif kind == "list":
            name, _ = payload  # type: ignore[misc]
            if name not in res.lists and key_source(name) in res.missing_optional:
                items = [MISSING_MARK.format(f"{name} ({RESULT_FILES[key_source(name)][0]})")]
            elif name not in res.lists:
                if not allow_missing:
                    raise PaperError(
                        f"paper source: unknown generated list '{name}' (known: {sorted(res.lists)})"
                    )
                used_missing.append(name)
                items = [MISSING_MARK.format(name)]
            else:
                items = res.lists[name]
            render_bullets(items)
        elif kind == "csv_table":
            name, caption, columns = payload  # type: ignore[misc]
            if name not in CSV_TABLES:
                raise PaperError(f"paper source: unknown csv table '{name}' (known: {sorted(CSV_TABLES)})")
            tab_no += 1
            table_caption(tab_no, text(caption))
            if name in res.csv_rows:
                rows = res.csv_rows[name]
                available = list(rows[0].keys()) if rows else list(CSV_TABLES[name])
                lacking = [c for c in columns if c not in available]
                if lacking:
                    raise PaperError(f"paper source: csv table '{name}' has no columns {lacking}")
                render_table_csv(pdf, rows, columns or available)
            elif name in res.missing_optional:
                render_missing_box(pdf, RESULT_FILES[name][0], optional=True)
            else:  # a required CSV table whose file is missing
                if not allow_missing:
                    raise MissingResultsError(f"table '{name}' needs {res.paths[name]}")
                used_missing.append(name)
                render_missing_box(pdf, RESULT_FILES[name][0])
            pdf.ln(2)
        elif kind == "table":
            name, caption = payload  # type: ignore[misc]
            source = {"recon": "recon_metrics", "train_speed": "train_speed"}.get(name)
            if source is None:
                raise PaperError(
                    f"paper source: unknown table '{name}' (known: recon, train_speed, csv NAME)"
                )
            tab_no += 1
            table_caption(tab_no, text(caption))
            if source in res.missing:
                if not allow_missing:
                    raise MissingResultsError(f"table '{name}' needs {res.paths[source]}")
                used_missing.append(source)
                render_missing_box(pdf, RESULT_FILES[source][0])
            elif name == "recon":
                render_table_recon(pdf, res)
            else:
                render_table_train_speed(pdf, res)
            pdf.ln(2)
        elif kind == "figure":
            name, caption = payload  # type: ignore[misc]
            if name not in RESULT_FILES or not RESULT_FILES[name][0].endswith(".png"):
                raise PaperError(f"paper source: unknown figure '{name}'")
            fig_no += 1
            if name in res.missing_optional:
                render_missing_box(pdf, RESULT_FILES[name][0], optional=True)
            elif name in res.missing:
                if not allow_missing:
                    raise MissingResultsError(f"figure '{name}' needs {res.paths[name]}")
                used_missing.append(name)
                render_missing_box(pdf, RESULT_FILES[name][0])
            else:
                from PIL import Image

                with Image.open(res.paths[name]) as im:
                    w_px, h_px = im.size
                # full text width, unless that makes the figure taller than about half a page
                width = min(text_width, 0.5 * (pdf.h - pdf.t_margin - pdf.b_margin) * w_px / h_px)
                height = width * h_px / w_px
                if pdf.will_page_break(height + 12):
                    pdf.add_page()
                pdf.image(res.paths[name], x=pdf.l_margin + (text_width - width) / 2, w=width)
            pdf.ln(1)
            pdf.set_font("Serif", "", 8.5)
            pdf.multi_cell(
                0,
                4,
                f"**Figure {fig_no}.** " + text(caption),
                markdown=True,
                new_x=XPos.LMARGIN,
                new_y=YPos.NEXT,
            )
            pdf.ln(2.5)
            body_font(pdf)
        else:  # pragma: no cover - parse_source only emits the kinds above
            raise PaperError(f"unknown block kind {kind}")

    atomic_write(out_path, pdf.output)
    return used_missing


def build_paper(
    source: str, results_dir: str, out_path: str, allow_missing: bool = False
) -> Tuple[Results, List[str]]:
    """Build the PDF.

    Args:
        source: path of the markdown-subset source (paper/paper.md).
        results_dir: folder with the results files (results/).
        out_path: the PDF to write.
        allow_missing: render marked placeholders for missing results instead of failing.

    Returns:
        The loaded results and the list of keys/files rendered as placeholders.

    Raises:
        MissingResultsError: a results file is missing and ``allow_missing`` is False.
        PaperError: a problem in the source.
    """
    res = load_results(results_dir)
    if res.missing and not allow_missing:
        lines = [f"  {res.paths[m]}  (written by {RESULT_FILES[m][1]})" for m in res.missing]
        raise MissingResultsError(
            "missing results files (see docs/results.md; or pass --allow_missing for a marked draft):\n"
            + "\n".join(lines)
        )
    add_generated_text(res)
    with open(source, encoding="utf-8") as f:
        blocks = parse_source(f.read())
    used = render(blocks, res, out_path, allow_missing)
    return res, used


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", default=os.path.join(REPO_ROOT, "paper", "paper.md"))
    parser.add_argument("--results_dir", default=os.path.join(REPO_ROOT, "results"))
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "paper.pdf"))
    parser.add_argument(
        "--allow_missing",
        action="store_true",
        help="render clearly marked placeholders (and a DRAFT banner) for missing results files",
    )
    args = parser.parse_args(argv)
    try:
        res, used = build_paper(args.source, args.results_dir, args.out, args.allow_missing)
    except (MissingResultsError, PaperError, ValueError) as e:
        print(f"build_paper: error: {e}", file=sys.stderr)
        return 1
    if used:
        print(f"build_paper: DRAFT, {len(used)} placeholders for missing results: {sorted(set(used))}")
    if res.missing_optional:
        files = ", ".join(RESULT_FILES[m][0] for m in res.missing_optional)
        print(f"build_paper: note: optional results not found, shown as placeholders: {files}")
    print(f"build_paper: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
