"""What the wire fuzz tests share: the decoder's known drop reasons, the settings, JSON values."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

#: every reason a DecodeError may give (a new one must be added here on purpose)
KNOWN_REASONS = {
    "parts",
    "oversized",
    "bad_header",
    "version",
    "bad_field",
    "dtype",
    "shape",
    "truncated",
    "size_mismatch",
}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: any JSON value, nested a little: what a hostile header may put in any field
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
