"""How the paper's PDF looks (fpdf2): the A4 page, the result tables and the missing-result box.

Used by build_paper.py, which parses paper/paper.md and fills in the values: this module only draws.
Tables: :func:`render_table_recon` (results/recon_metrics.csv), :func:`render_table_train_speed`
(results/train_speed.csv) and :func:`render_table_csv` (a small CSV as it is; :func:`csv_table_cells`
turns ``X`` and ``X_std`` into one ``mean ± std`` column).
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple, Union

import matplotlib
from fpdf import FPDF
from fpdf.enums import XPos, YPos
from fpdf.fonts import FontFace
from results_values import COIL_NAMES, DECIMALS, Results, fmt_number

FONT_DIR = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")


class PaperPDF(FPDF):
    """A4 article layout with a running header, page numbers and an optional DRAFT banner."""

    def __init__(self, short_title: str, draft_note: Optional[str]) -> None:
        super().__init__(orientation="P", unit="mm", format="A4")
        self.short_title = short_title
        self.draft_note = draft_note
        self.set_margins(20, 20, 20)
        self.set_auto_page_break(True, margin=18)
        for family, stem in (("Serif", "DejaVuSerif"), ("Sans", "DejaVuSans")):
            self.add_font(family, "", os.path.join(FONT_DIR, f"{stem}.ttf"))
            self.add_font(family, "B", os.path.join(FONT_DIR, f"{stem}-Bold.ttf"))
            italic = "Italic" if family == "Serif" else "Oblique"
            self.add_font(family, "I", os.path.join(FONT_DIR, f"{stem}-{italic}.ttf"))
            self.add_font(family, "BI", os.path.join(FONT_DIR, f"{stem}-Bold{italic}.ttf"))

    def header(self) -> None:
        if self.draft_note:
            self.set_font("Sans", "B", 8)
            self.set_text_color(200, 0, 0)
            self.set_xy(self.l_margin, 4)
            self.multi_cell(0, 4, self.draft_note, align="C", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            self.set_text_color(0, 0, 0)
        if self.page_no() > 1:
            self.set_font("Sans", "I", 7.5)
            self.set_text_color(110, 110, 110)
            self.set_xy(self.l_margin, 13)
            self.cell(0, 4, self.short_title, align="L")
            self.set_text_color(0, 0, 0)
        self.set_y(self.t_margin)

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font("Sans", "", 8)
        self.set_text_color(110, 110, 110)
        self.cell(0, 5, str(self.page_no()), align="C")
        self.set_text_color(0, 0, 0)


def body_font(pdf: FPDF) -> None:
    pdf.set_font("Serif", "", 10)


def _table(
    pdf: FPDF,
    widths: List[int],
    headings: List[str],
    cells: List[List[str]],
    align: Union[str, Tuple[str, ...]],
) -> None:
    """One table in the paper's style: bold grey heading row, horizontal rules, then the cell rows.

    ``align`` is one fpdf2 ``text_align`` for every column, or one per column.
    """
    with pdf.table(
        col_widths=widths,
        headings_style=FontFace(emphasis="BOLD", fill_color=(230, 230, 230)),
        line_height=4,
        padding=0.8,
        borders_layout="HORIZONTAL_LINES",
        text_align=align,
    ) as table:
        row = table.row()
        for h in headings:
            row.cell(h)
        for line in cells:
            row = table.row()
            for c in line:
                row.cell(c)


def render_table_recon(pdf: FPDF, res: Results) -> None:
    """The reconstruction table: one row per setting x method, mean ± std over volumes."""
    headings = ["Coil", "R", "Method", "NMSE", "PSNR (dB)", "SSIM", "NFE×K", "s/slice", "r(σ, |err|)"]
    widths = [15, 7, 33, 25, 21, 21, 12, 12, 24]
    rows = []
    for r in res.recon_rows:
        nfe = fmt_number(r["nfe"], 0) if r["nfe"] not in ("", "0") else "–"
        k = fmt_number(r["num_samples"], 0) if r["num_samples"] not in ("", "0") else ""
        corr = (
            f"{fmt_number(r['std_err_corr_mean'], 2)} ± {fmt_number(r['std_err_corr_std'], 2)}"
            if r["std_err_corr_mean"] not in ("", None)
            else "–"
        )
        rows.append(
            [
                COIL_NAMES.get(r["coil"], r["coil"]),
                f"{fmt_number(r['acceleration'], 0)}×",
                r["label"],
                f"{fmt_number(r['nmse_mean'], 4)} ± {fmt_number(r['nmse_std'], 4)}",
                f"{fmt_number(r['psnr_mean'], 2)} ± {fmt_number(r['psnr_std'], 2)}",
                f"{fmt_number(r['ssim_mean'], 3)} ± {fmt_number(r['ssim_std'], 3)}",
                f"{nfe}×{k}" if k else nfe,
                fmt_number(r["sec_per_slice"], 2),
                corr,
            ]
        )
    pdf.set_font("Sans", "", 6.5)
    _table(pdf, widths, headings, rows, ("LEFT", "CENTER", "LEFT") + ("CENTER",) * 6)
    body_font(pdf)


# train_speed.csv column -> (heading, relative width); unknown columns get their name and width 14
SPEED_HEADINGS = {
    "name": ("Configuration", 24),
    "device": ("Device", 24),
    "precision": ("Precision", 15),
    "threads": ("Threads", 13),
    "image_size": ("Image", 11),
    "num_channels": ("Channels", 15),
    "batch_size": ("Batch", 11),
    "params_m": ("Params (M)", 17),
    "sec_per_step": ("s/step", 13),
    "samples_per_sec": ("Samples/s", 16),
    "upstream_sec_per_step": ("Upstream s/step", 22),
    "speedup": ("Speed-up", 15),
}


def render_table_train_speed(pdf: FPDF, res: Results) -> None:
    """The training-speed table: the non-empty columns of results/train_speed.csv."""
    rows = res.train_speed_rows
    columns = [c for c in (rows[0].keys() if rows else []) if any(r.get(c, "") != "" for r in rows)]
    headings = [SPEED_HEADINGS.get(c, (c, 14))[0] for c in columns]
    widths = [SPEED_HEADINGS.get(c, (c, 14))[1] for c in columns]
    cells = [
        [res.values.get(f"speed.{r['name']}.{c}", r[c]) if c != "name" else r[c] for c in columns]
        for r in rows
    ]
    pdf.set_font("Sans", "", 7)
    _table(pdf, widths, headings, cells, "CENTER")
    body_font(pdf)


# csv column -> heading of ``::: table csv`` (other columns: their name)
CSV_HEADINGS = {
    "acceleration": "R",
    "lambda": "λ",
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "nmse": "NMSE",
    "noise_residual_ratio": "residual / noise",
    "seconds": "s",
}


def csv_cell(column: str, value: str) -> str:
    """A CSV value for a table: numbers by fmt_number (DECIMALS by column, else integers as integers and
    2 decimals), values written with an exponent (a λ of 1e-3) and text as they are."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return value if value not in ("", None) else "–"
    if "e" in value.lower() and "inf" not in value.lower() and "nan" not in value.lower():
        return value
    decimals = next((d for prefix, d in DECIMALS.items() if column.startswith(prefix)), None)
    if decimals is None:
        decimals = 0 if x.is_integer() else 2
    cell = fmt_number(x, decimals)
    return f"{cell}×" if column == "acceleration" else cell


def csv_table_cells(rows: List[dict], columns: List[str]) -> Tuple[List[str], List[List[str]]]:
    """Headings and cells of a ``::: table csv``: ``X`` and ``X_std`` become one ``mean ± std`` column."""
    shown = [c for c in columns if not (c.endswith("_std") and c[: -len("_std")] in columns)]
    headings = [CSV_HEADINGS.get(c, c) for c in shown]
    cells = []
    for r in rows:
        line = []
        for c in shown:
            cell = csv_cell(c, r.get(c, ""))
            if f"{c}_std" in columns and r.get(f"{c}_std", "") not in ("", None):
                cell += f" ± {csv_cell(c, r[c + '_std'])}"
            line.append(cell)
        cells.append(line)
    return headings, cells


def render_table_csv(pdf: FPDF, rows: List[dict], columns: List[str]) -> None:
    """A small CSV as a table, column widths by the longest entry."""
    headings, cells = csv_table_cells(rows, columns)
    widths = [max([len(h)] + [len(line[j]) for line in cells]) + 2 for j, h in enumerate(headings)]
    pdf.set_font("Sans", "", 6.5 if sum(widths) > 110 else 7)
    _table(pdf, widths, headings, cells, "LEFT")
    body_font(pdf)


def render_missing_box(pdf: FPDF, what: str, optional: bool = False) -> None:
    pdf.set_font("Sans", "B", 9)
    pdf.set_text_color(200, 0, 0)
    pdf.set_draw_color(200, 0, 0)
    note = " (optional; this build was made without it)" if optional else ""
    pdf.multi_cell(0, 12, f"PLACEHOLDER: {what} is missing{note}", border=1, align="C")
    pdf.set_text_color(0, 0, 0)
    pdf.set_draw_color(0, 0, 0)
    body_font(pdf)
