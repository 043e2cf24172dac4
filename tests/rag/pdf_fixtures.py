"""Real small PDFs for the RAG tests, written with pypdf (one Helvetica text line per page)."""

import io

from pypdf import PageObject, PdfWriter
from pypdf.generic import DictionaryObject, NameObject, StreamObject


def pdf_bytes(pages: list[str]) -> bytes:
    """A PDF whose page i shows ``pages[i]`` (an empty string gives a page without text)."""
    writer = PdfWriter()
    font = writer._add_object(DictionaryObject({
        NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
        NameObject("/BaseFont"): NameObject("/Helvetica")}))
    for text in pages:
        page = PageObject.create_blank_page(width=612, height=792)
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})})
        content = StreamObject()
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        content.set_data(f"BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET".encode("latin-1") if text else b"")
        page[NameObject("/Contents")] = writer._add_object(content)
        writer.add_page(page)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
