"""The README's main command (the memory benchmark, quick mode) keeps working."""

from experiments import memory_bench


def test_memory_bench_quick_mode_prints_its_tables(capsys, tmp_path):
    out_file = tmp_path / "bench.json"
    memory_bench.main(["--quick", "--no-peer", "--json", str(out_file)])
    printed = capsys.readouterr().out
    assert "float32 matmul rate" in printed
    assert "| fwd " in printed and "| fwd+bwd " in printed
    assert "scaling with sequence length" in printed
    import json

    result = json.loads(out_file.read_text())
    for name in ("fwd", "fwd+bwd"):
        assert result["ours"][name]["tokens_per_s"] > 0
        assert result["ours"][name]["flops"] > 0
    assert [row["tokens"] for row in result["scaling"]] == [128, 512]
