"""Job outputs go to a URI: a fused adapter written to an object-store-like fsspec URI."""

from __future__ import annotations

import json
import uuid

import pytest

from engine.adapters import load_adapter
from engine.catalog import fs as cfs
from engine.errors import CatalogError
from engine.fusion import PROVENANCE_FILE, fuse_adapters
from tests.helpers import make_adapter


def test_fused_adapter_saved_to_a_uri(tmp_path):
    adapters = [load_adapter(make_adapter(tmp_path / f"a{i}", seed=i)) for i in range(2)]
    result = fuse_adapters(adapters, "linear")
    uri = f"memory://icmf-test-{uuid.uuid4().hex}/fused"
    result.save(uri)
    fs, root = cfs.resolve_uri(uri)
    assert set(cfs.list_names(fs, root)) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        PROVENANCE_FILE,
    }
    assert json.loads(cfs.read_bytes(fs, cfs.join(root, PROVENANCE_FILE)))["method"] == "linear"
    with pytest.raises(CatalogError, match="already exists"):
        result.save(uri)
    result.save(uri, overwrite=True)
