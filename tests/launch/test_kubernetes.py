"""launch.kubernetes: an MPI-operator MPIJob (kubeflow.org/v2beta1) whose launcher starts the toolkit entry point."""
from __future__ import annotations

import yaml

from launch.kubernetes import main
from tests.launch.cli import run_main, run_module

IMAGE = "registry.example.com/cxrscale:1.0"


def manifest(tmp_path, capsys, *options: str, data: str = "/workspace/prepared/kermany") -> tuple[int, str, dict]:
    out = tmp_path / "mpijob.yaml"
    code, stdout, stderr = run_main(main, ["--image", IMAGE, "--workers", "2", "--gpus-per-worker", "4",
                                           "--output", str(out), *options, "--", "distributed.train", "--data", data,
                                           "--output", "/workspace/runs/my run"], capsys)
    return code, stdout + stderr, (yaml.safe_load(out.read_text()) if out.exists() else {})


def test_mpijob_schema_and_launcher_command(tmp_path, capsys):
    code, text, job = manifest(tmp_path, capsys, "--name", "cxr-resnet", "--namespace", "ml", "--pvc", "data-claim",
                               "--cpu", "16", "--memory", "64Gi")
    assert code == 0, text
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v2beta1", "MPIJob")
    assert job["metadata"]["name"] == "cxr-resnet" and job["metadata"]["namespace"] == "ml"
    spec = job["spec"]
    assert spec["slotsPerWorker"] == 4
    assert spec["runPolicy"]["cleanPodPolicy"] == "Running"
    assert spec["mpiImplementation"] == "OpenMPI"
    launcher, worker = spec["mpiReplicaSpecs"]["Launcher"], spec["mpiReplicaSpecs"]["Worker"]
    assert launcher["replicas"] == 1 and worker["replicas"] == 2
    (lc,), (wc,) = launcher["template"]["spec"]["containers"], worker["template"]["spec"]["containers"]
    assert lc["image"] == wc["image"] == IMAGE
    assert wc["resources"]["limits"] == {"nvidia.com/gpu": 4, "cpu": "16", "memory": "64Gi"}
    command = lc["command"]
    assert command[:4] == ["mpirun", "--allow-run-as-root", "-np", "8"]
    for flag in (["-bind-to", "none"], ["-map-by", "slot"], ["-x", "NCCL_DEBUG"], ["-x", "LD_LIBRARY_PATH"],
                 ["-x", "PATH"], ["-x", "TF_USE_LEGACY_KERAS"]):
        assert any(command[i:i + 2] == flag for i in range(len(command))), flag
    i = command.index("python")
    assert command[i:] == ["python", "-m", "distributed.train", "--data", "/workspace/prepared/kermany",
                           "--output", "/workspace/runs/my run"]
    assert {"name": "TF_USE_LEGACY_KERAS", "value": "1"} in lc["env"]
    assert wc["volumeMounts"] == [{"name": "data", "mountPath": "/workspace"}]
    assert worker["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "data-claim"}
    assert "kubectl apply -f" in text


def test_horovodrun_launcher_on_cpu_pods(tmp_path, capsys):
    code, text, job = manifest(tmp_path, capsys, "--gpus-per-worker", "0", "--slots-per-worker", "3",
                               "--launcher", "horovodrun")
    assert code == 0, text
    (lc,) = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"]
    assert lc["command"][:5] == ["horovodrun", "-np", "6", "--hostfile", "/etc/mpi/hostfile"]
    assert job["spec"]["slotsPerWorker"] == 3
    (wc,) = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    assert "resources" not in wc


def test_tf_backend_writes_a_tfjob_of_one_worker_per_gpu(tmp_path, capsys):
    code, out, _ = manifest(tmp_path, capsys, "--backend", "tf")
    assert code == 2 and "--workers 8 --gpus-per-worker 1" in out  # one tf.distribute worker per GPU
    out_file = tmp_path / "tfjob.yaml"
    code, stdout, stderr = run_main(main, ["--image", IMAGE, "--workers", "8", "--gpus-per-worker", "1", "--backend",
                                           "tf", "--pvc", "data", "--output", str(out_file), "--", "distributed.train",
                                           "--data", "/workspace/prepared/kermany"], capsys)
    assert code == 0, stdout + stderr
    job = yaml.safe_load(out_file.read_text())
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "TFJob"
    worker = job["spec"]["tfReplicaSpecs"]["Worker"]
    [container] = worker["template"]["spec"]["containers"]
    assert worker["replicas"] == 8 and worker["restartPolicy"] == "Never"
    assert container["name"] == "tensorflow" and container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["command"] == ["python", "-m", "distributed.train", "--data", "/workspace/prepared/kermany",
                                    "--backend", "tf"]
    assert container["volumeMounts"] == [{"name": "data", "mountPath": "/workspace"}]


def test_bad_name_exits_2(tmp_path):
    result = run_module("launch.kubernetes", "--image", IMAGE, "--workers", "2", "--gpus-per-worker", "4",
                        "--name", "CXR_train", "--output", str(tmp_path / "job.yaml"),
                        "--", "distributed.train", "--data", "/workspace/prepared/x", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --name 'CXR_train' is not a Kubernetes name")
    assert not (tmp_path / "job.yaml").exists()


def test_local_dataset_with_too_few_shards_is_refused(prepared64, tmp_path, capsys):
    code, text, job = manifest(tmp_path, capsys, data=str(prepared64))  # 2 pods x 4 GPUs, 4 shards
    assert code == 2 and not job
    assert f"{prepared64} has 4 train shard files for 8 workers" in text


def test_elastic_launcher_discovers_hosts_from_the_operators_hostfile(tmp_path, capsys):
    out_file = tmp_path / "mpijob.yaml"
    code, out, err = run_main(main, ["--image", "reg/cxrscale:1", "--workers", "3", "--gpus-per-worker", "2",
                                     "--launcher", "horovodrun", "--min-np", "2", "--output", str(out_file), "--",
                                     "distributed.train", "--data", "/workspace/prepared/kermany"], capsys)
    assert code == 0, err
    manifest = yaml.safe_load(out_file.read_text().split("\n", 2)[2])
    launcher = manifest["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    shell, flag, script = launcher["command"]
    assert (shell, flag) == ("sh", "-c")
    assert script.startswith("python -m launch.hostfile --nodes-file /etc/mpi/hostfile --discovery-script "
                             "/tmp/discover_hosts.sh >/dev/null && exec horovodrun -np 6 --min-np 2 --max-np 6 "
                             "--host-discovery-script /tmp/discover_hosts.sh ")
    assert script.endswith("python -m distributed.train --data /workspace/prepared/kermany --elastic")
    code, _, err = run_main(main, ["--image", "reg/cxrscale:1", "--workers", "3", "--gpus-per-worker", "2",
                                   "--min-np", "2", "--output", str(out_file), "--", "distributed.train", "--data",
                                   "/workspace/prepared/kermany"], capsys)
    assert code == 2 and "only horovodrun starts" in err
