"""`fab -H HOST TASK`: the deploy commands as Fabric tasks.

HOST is looked up in the inventory ($DEPLOY_HOSTS, else deployment/hosts.yaml) to find
its environment; the task then runs exactly like `deploy ENV TASK`, on that host only,
with the same arguments, checks, host-key policy, timeouts and exit codes. The tasks are
generated from the CLI's command table (deployment/fabric_tasks.py). Examples:

    fab -H staging-host status
    fab -H dev-host up --detach --build
    fab -H dev-host logs --tail 50 --services web,worker
    fab --dry -H prod-host down --volumes --yes      # prints what would run
"""

from deployment.fabric_tasks import tasks

globals().update({("test_" if name == "test" else name): task for name, task in tasks().items()})
