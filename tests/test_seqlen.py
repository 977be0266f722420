"""--seqlen defaults to what the model can take, and a longer one is refused naming both numbers."""

from __future__ import annotations

import json
import shutil

from conftest import assert_user_error, cli
from graphs import Dense, chain_model, save

from onnxprune.data import DEFAULT_SEQLEN, max_positions, window_length


def test_seqlen_from_config_beside_the_model(onnx_dir, eval_txt, tmp_path):
    model = onnx_dir / "model.onnx"
    assert max_positions(model) == 128  # the fixture's max_position_embeddings
    assert window_length(model, None) == 128
    line = assert_user_error(cli("apply", model, "-m", "wanda", "-s", "0.5", "--calib", eval_txt, "--nsamples", "2",
                                 "--seqlen", "512", "-o", tmp_path / "o.onnx"))
    assert "512" in line and "128" in line
    assert not (tmp_path / "o.onnx").exists()
    line = assert_user_error(cli("eval", model, "--eval", eval_txt, "--seqlen", "129"))
    assert "129" in line and "128" in line
    # The default fits: 2 windows of 128 tokens calibrate without an error.
    cli("apply", model, "-m", "wanda", "-s", "0.5", "--calib", eval_txt, "--nsamples", "2",
        "-o", tmp_path / "d.onnx").ok()


def test_seqlen_from_the_position_table_or_unknown(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    table = numpy_helper.from_array(np.zeros((64, 8), np.float32), "model.decoder.embed_positions.weight")
    graph = helper.make_graph([helper.make_node("Gather", [table.name, "pos"], ["h"])], "g",
                              [helper.make_tensor_value_info("pos", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, None)], [table])
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    assert window_length(tmp_path / "model.onnx", None) == 64
    chain = save(chain_model([Dense("MatMul", 8, 8)]), tmp_path / "chain" / "model.onnx")
    assert max_positions(chain) is None and window_length(chain, None) == DEFAULT_SEQLEN
    (chain.parent / "config.json").write_text(json.dumps({"n_positions": 4096}))
    assert window_length(chain, None) == DEFAULT_SEQLEN and window_length(chain, 4096) == 4096
    shutil.rmtree(chain.parent)
