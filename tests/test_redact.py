"""One redaction rule for every URI that is stored, logged or shown."""
from __future__ import annotations

import pytest

from weakseg.tasks.storage import redact, redact_url


@pytest.mark.parametrize(
    ("url", "clean"),
    [
        ("s3://bucket/a.jpg", "s3://bucket/a.jpg"),
        ("/data/a b.jpg", "/data/a b.jpg"),
        ("https://user:pass@host.example/a.jpg", "https://host.example/a.jpg"),
        ("https://token@host.example:8443/a.jpg?w=1", "https://host.example:8443/a.jpg?w=1"),
        ("https://b.s3.amazonaws.com/a.jpg?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab12&v=2",
         "https://b.s3.amazonaws.com/a.jpg?v=2"),
        ("https://acct.blob.core.windows.net/c/a.jpg?sv=2020&sig=SECRET", "https://acct.blob.core.windows.net/c/a.jpg?sv=2020"),
        ("http://h/a.jpg?access_token=abc&size=2", "http://h/a.jpg?size=2"),
    ],
)
def test_redact_url(url: str, clean: str) -> None:
    assert redact_url(url) == clean


def test_redact_in_text() -> None:
    msg = "HTTP 403 for https://alice:s3cr3t@h.example/x.jpg?Signature=zz&a=1: denied"
    out = redact(msg)
    assert "s3cr3t" not in out and "zz" not in out and "alice" not in out
    assert "https://h.example/x.jpg?a=1" in out
