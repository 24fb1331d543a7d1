#!/bin/bash
# A sweep on a Slurm allocation: Ray head on the first node, one Ray worker per other node,
# the sweep driven from the head, everything stopped when it ends.
#   sbatch cluster/slurm_sweep.sh sweeps/sst2_gpt2.yaml [dotted overrides...]
# Adjust the #SBATCH lines to your cluster (partition, GPUs per node, time).
#SBATCH --job-name=sae-ray
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=sae-ray-%j.log
set -euo pipefail

SWEEP=${1:?usage: sbatch cluster/slurm_sweep.sh SWEEP.yaml [overrides...]}
shift
# The environment made by `make install` (or your own venv with the package installed).
source "${SAE_RAY_VENV:-$PWD/.venv}/bin/activate"

nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk '{print $1}')
port=6379
export RAY_AUTH_MODE=token     # token auth; the token is generated below, shared via $HOME
ray get-auth-token --generate >/dev/null

# Ray's dashboard listens on the head's loopback only: reach it with
#   ssh -L 8265:localhost:8265 <login node> ssh -L 8265:localhost:8265 $head
srun --nodes=1 --ntasks=1 -w "$head" \
  ray start --head --node-ip-address="$head_ip" --port=$port --dashboard-host=127.0.0.1 \
  --num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus="${SLURM_GPUS_PER_NODE:-0}" --block &
sleep 20

for node in "${nodes[@]:1}"; do
  srun --nodes=1 --ntasks=1 -w "$node" \
    ray start --address="$head_ip:$port" \
    --num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus="${SLURM_GPUS_PER_NODE:-0}" --block &
done
sleep 20

# The driver runs on the head node's allocation (this batch step) and joins the cluster.
status=0
sae-ray sweep "$SWEEP" "$@" --address "$head_ip:$port" || status=$?
ray stop --force || true
exit $status
