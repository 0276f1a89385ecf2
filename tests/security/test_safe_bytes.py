"""Hostile bytes at the API: each gets its documented refusal, nothing is stored, and
the control plane keeps serving and placing jobs afterwards."""

from __future__ import annotations

from collections.abc import Iterator

from scheduler.api.guards import MIB
from scheduler.core.states import JobState
from tests.integration.conftest import Api, entrypoint_yaml

YAML = {"content-type": "application/yaml"}

# Six levels of aliases under `config:` (the "billion laughs"): 9**6 strings once
# expanded, and 15.8 MB of stored spec before aliases were refused.
ALIAS_BOMB = """name: bomb
experiment: it
entrypoint: tests.integration.user_code:count_steps
train: {max_steps: 1}
config:
  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
  b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
  c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
  d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
  e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
  f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
  g: [*f,*f,*f,*f,*f,*f,*f,*f,*f]
"""

DEPLOYMENT = "name: mlp\nmodel: models:/mlp@champion\n"


def job_yaml(name: str = "ok") -> str:
    return entrypoint_yaml(name, "count_steps", steps=1, step_s=0)


def test_a_huge_body_is_refused_and_the_api_keeps_serving_and_placing(api: Api) -> None:
    limit = MIB  # max_config_bytes: the default off the predict routes
    padding = "#" * (limit + 1)
    declared = api.http.post("/jobs", content=job_yaml() + padding, headers=YAML)
    assert declared.status_code == 413
    assert f"limit of {limit} bytes" in declared.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
        yield job_yaml().encode()
        for _ in range(4):
            yield b"#" * (limit // 2)

    streamed = api.http.post("/jobs", content=chunks(), headers=YAML)
    assert streamed.status_code == 413
    assert f"limit of {limit} bytes" in streamed.json()["detail"]
    assert api.http.get("/jobs").json() == []  # nothing stored

    assert api.http.get("/healthz").json()["status"] == "ok"
    accepted = api.http.post("/jobs", content=job_yaml("after"), headers=YAML)
    assert accepted.status_code == 201, accepted.text
    api.wait_for(accepted.json()["id"], {JobState.SUCCEEDED})  # placed, run, done


CROSS_SITE_TYPES = (
    "text/plain",
    "text/plain;charset=UTF-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    None,  # a browser's fetch of a Blob without a type sends none
)


def test_a_body_neither_json_nor_yaml_is_refused_on_mutating_routes(api: Api) -> None:
    for content_type in CROSS_SITE_TYPES:
        headers = {"origin": "http://evil.example"}
        if content_type is not None:
            headers["content-type"] = content_type
        for path in ("/jobs", "/jobs/validate", "/deployments", "/v1/models/mlp/predict"):
            response = api.http.post(path, content=job_yaml(), headers=headers)
            assert response.status_code == 415, (content_type, path, response.text)
            assert "application/json" in response.json()["detail"]
    assert api.http.get("/jobs").json() == []
    assert api.http.get("/deployments").json() == []


def test_json_and_yaml_types_are_accepted_and_bodyless_posts_need_none(api: Api) -> None:
    for content_type in (
        "application/json; charset=utf-8",
        "application/yaml",
        "application/x-yaml",
        "text/yaml",
    ):
        response = api.http.post(
            "/jobs/validate", content=job_yaml(), headers={"content-type": content_type}
        )
        assert response.status_code == 200, (content_type, response.text)
    job_id = api.http.post("/jobs", content=job_yaml(), headers=YAML).json()["id"]
    assert api.http.post(f"/jobs/{job_id}/cancel").status_code == 200


def test_a_host_not_served_is_refused(api: Api) -> None:
    port = api.http.base_url.port
    refused = api.http.get("/healthz", headers={"host": "evil.example"})
    assert refused.status_code == 400
    assert "'evil.example' is not served" in refused.json()["detail"]
    submitted = api.http.post(
        "/jobs", content=job_yaml(), headers={**YAML, "host": f"evil.example:{port}"}
    )
    assert submitted.status_code == 400
    assert api.http.get("/jobs").json() == []
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert api.http.get("/healthz", headers={"host": host}).status_code == 200, host


def test_an_alias_bomb_is_refused_and_nothing_is_stored(api: Api) -> None:
    assert len(ALIAS_BOMB) < 600
    for path in ("/jobs", "/jobs/validate"):
        response = api.http.post(path, content=ALIAS_BOMB, headers=YAML)
        assert response.status_code == 422
        (problem,) = response.json()["detail"]
        assert "YAML aliases (*a) are not accepted, at line 7, column 10" in problem["msg"]
    deployment = "name: mlp\nmodel: &m models:/mlp@champion\ntags: {m: *m}\n"
    response = api.http.post("/deployments", content=deployment, headers=YAML)
    assert response.status_code == 422
    assert "YAML aliases (*m)" in response.json()["detail"][0]["msg"]
    assert api.http.get("/jobs").json() == []
    assert api.http.get("/deployments").json() == []


NON_FINITE = (
    ("/jobs", job_yaml().replace("memory_gb: 1", "memory_gb: .inf"), "resources.memory_gb"),
    ("/jobs", job_yaml() + "data: {seed: 0, options: {noise: .nan}}\n", "data.options.noise"),
    ("/jobs", job_yaml().replace("config: {", "config: {x: -.inf, "), "config.x"),
    (
        "/jobs",
        job_yaml().replace("gpus: 0", "gpus: 1, gpu_memory_gb: 1.0e+999"),
        "resources.gpu_memory_gb",
    ),
    ("/deployments", DEPLOYMENT + "slo: {p99_ms: .inf}\n", "slo.p99_ms"),
    ("/deployments", DEPLOYMENT + "resources: {memory_gb: .nan}\n", "resources.memory_gb"),
    ("/deployments", DEPLOYMENT + "batching: {max_wait_ms: -.inf}\n", "batching.max_wait_ms"),
)


def test_a_non_finite_number_is_refused_naming_the_field(api: Api) -> None:
    for path, text, loc in NON_FINITE:
        response = api.http.post(path, content=text, headers=YAML)
        assert response.status_code == 422, (loc, response.text)
        (problem,) = response.json()["detail"]
        assert problem["loc"] == loc
        assert "must be a finite number" in problem["msg"]
    assert api.http.get("/jobs").json() == []
    assert api.http.get("/deployments").json() == []


def test_a_non_finite_number_in_json_is_refused(api: Api) -> None:
    body = '{"name": "x", "model": "models:/mlp@champion", "slo": {"p99_ms": NaN}}'
    response = api.http.post(
        "/deployments", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    (problem,) = response.json()["detail"]
    assert problem["loc"] == "slo.p99_ms"
    assert "finite number" in problem["msg"]


OVERSIZE = (
    ("/jobs", job_yaml().replace("gpus: 0", "gpus: 65"), "resources.gpus", "64"),
    (
        "/jobs",
        job_yaml().replace("gpus: 0", "gpus: 1, gpu_memory_gb: 1e308"),
        "resources.gpu_memory_gb",
        "1024",
    ),
    (
        "/jobs",
        job_yaml().replace("memory_gb: 1", "memory_gb: 1e308"),
        "resources.memory_gb",
        "16384",
    ),
    ("/jobs", job_yaml().replace("cpus: 1", "cpus: 100000"), "resources.cpus", "256"),
    (
        "/jobs",
        job_yaml() + "tags: {" + "k" * 251 + ": v}\n",
        "tags." + "k" * 251 + ".[key]",
        "",
    ),
    (
        "/jobs",
        job_yaml() + "tags: {" + ", ".join(f"t{i}: v" for i in range(101)) + "}\n",
        "tags",
        "100",
    ),
    (
        "/deployments",
        DEPLOYMENT + "replicas: {min: 100000, max: 100000}\n",
        "replicas.min",
        "256",
    ),
    ("/deployments", DEPLOYMENT + "max_queue: 1000000000\n", "max_queue", "100000"),
    (
        "/deployments",
        DEPLOYMENT + "batching: {max_batch_size: 100000}\n",
        "batching.max_batch_size",
        "4096",
    ),
)


def test_an_oversize_request_is_refused_naming_the_field(api: Api) -> None:
    for path, text, loc, words in OVERSIZE:
        response = api.http.post(path, content=text, headers=YAML)
        assert response.status_code == 422, (loc, response.text)
        detail = response.json()["detail"]
        assert any(d["loc"] == loc and words in d["msg"] for d in detail), detail
    assert api.http.get("/jobs").json() == []
    assert api.http.get("/deployments").json() == []


def test_200000_tags_are_refused_before_they_are_read(api: Api) -> None:
    tags = "tags: {" + ", ".join(f"t{i}: v" for i in range(200_000)) + "}\n"
    response = api.http.post("/jobs", content=job_yaml() + tags, headers=YAML)
    assert response.status_code == 413
    assert api.http.get("/jobs").json() == []


def test_a_log_offset_beyond_any_file_is_refused(api: Api) -> None:
    job_id = api.http.post("/jobs", content=job_yaml(), headers=YAML).json()["id"]
    response = api.http.get(f"/jobs/{job_id}/logs", params={"offset": 2**63})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "offset"]
    assert api.http.get(f"/jobs/{job_id}/logs", params={"offset": 2**63 - 1}).json() == {
        "text": "",
        "next_offset": 2**63 - 1,
    }
