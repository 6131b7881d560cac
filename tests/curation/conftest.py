import pytest

from curation import demo_data as dd


@pytest.fixture(scope="module")
def demo_server():
    """Local HTTP server with a few real photos, generated images and every kind of bad input."""
    items = dd.demo_items(n_synthetic=6) + dd.bad_items()
    with dd.DemoServer(items) as srv:
        srv.items = items
        yield srv
