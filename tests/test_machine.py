import json
import os

from imageragturbo.machine import describe_machine, load_average, package_version
from imageragturbo.machine import latency_fields as latency_machine
from imageragturbo.machine import retrieval_fields as retrieval_machine
from imageragturbo.machine import service_fields as service_machine


def test_describe_machine_fills_every_field():
    m = describe_machine(("numpy", "no_such_module_irt"), gpu=True)
    assert m.cpu and m.cpu != "unknown" and m.logical_cores == os.cpu_count()
    assert m.ram_gib > 0 and m.python.count(".") == 2 and m.system and m.platform and m.date
    assert m.versions["numpy"] and m.versions["no_such_module_irt"] is None
    assert m.load_avg is None or (len(m.load_avg) == 3 and all(x >= 0 for x in m.load_avg))
    assert m.nice is None or isinstance(m.nice, int)
    assert package_version("os") == "installed"  # a module without __version__


def test_summary_names_cpu_cores_and_torch():
    m = describe_machine(("torch",), gpu=True)
    summary = m.summary()
    assert summary.startswith(f"{m.cpu}, {m.logical_cores} cores, {m.system}, torch {m.versions['torch']} (")
    assert summary.endswith(f"({m.gpu or 'CPU'})")
    assert "torch" not in describe_machine().summary()


def test_each_report_keeps_its_fields_and_they_serialise():
    reports = {
        "latency": (latency_machine(2), {"cpu", "logical_cores", "threads", "platform", "python", "torch",
                                         "onnxruntime", "gpu", "date", "load_avg_1m_at_start"}),
        "retrieval": (retrieval_machine(), {"cpu", "cores", "ram_gib", "python", "platform", "versions", "loadavg_start"}),
        "service": (service_machine(), {"cpu", "cores", "python", "load_avg_at_start"}),
    }
    for name, (fields, expected) in reports.items():
        assert expected <= set(fields), (name, expected - set(fields))
        assert json.loads(json.dumps(fields)).keys() == fields.keys(), name  # JSON-serialisable
    assert reports["latency"][0]["threads"] == 2
    assert set(reports["retrieval"][0]["versions"]) == {"numpy", "scann", "faiss", "hnswlib"}
    if load_average() is not None:
        assert len(reports["service"][0]["load_avg_at_start"]) == 3
        assert len(reports["retrieval"][0]["loadavg_start"]) == 3
