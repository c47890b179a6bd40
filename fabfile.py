"""`fab -H HOST TASK`: the deploy commands as Fabric tasks.

HOST is looked up in the inventory ($DEPLOY_HOSTS, else deployment/hosts.yaml) to find
its environment; the task then runs exactly like `deploy ENV TASK`, on that host only,
with the same host-key policy and timeouts. Examples:

    fab -H staging-host status
    fab -H dev-host up --detach --build
    fab -H dev-host logs --tail 50 --services web,worker
"""
from fabric import task

from deployment import operations as ops
from deployment.fabric_tasks import run


def _split(services: str) -> list[str]:
    return [s for s in (services or "").split(",") if s]


@task(help={"detach": "return once healthy", "build": "rebuild images first",
            "services": "comma-separated services (default: all)", "env": "environment, if the host is in several"})
def up(c, detach=False, build=False, services="", env=None):
    """Start the services."""
    run(c, ops.up, env, services=_split(services), detach=detach, build=build)


@task(help={"volumes": "also remove named volumes (DATA)", "yes": "confirm without a prompt",
            "env": "environment, if the host is in several"})
def down(c, volumes=False, yes=False, env=None):
    """Stop and remove the services and networks."""
    run(c, ops.down, env, volumes=volumes, yes=yes)


@task(help={"services": "comma-separated services (default: all)", "env": "environment, if the host is in several"})
def build(c, services="", env=None):
    """Build the images."""
    run(c, ops.build, env, services=_split(services))


@task(help={"follow": "stream until Ctrl+C", "tail": "last N lines per service",
            "services": "comma-separated services (default: all)", "env": "environment, if the host is in several"})
def logs(c, follow=False, tail=None, services="", env=None):
    """Show the services' logs."""
    run(c, ops.logs, env, services=_split(services), follow=follow,
        tail=int(tail) if tail is not None else None)


@task(help={"json": "one JSON document", "env": "environment, if the host is in several"})
def status(c, json=False, env=None):
    """Each service's state, health and published ports."""
    run(c, ops.status, env, as_json=json)


@task(help={"env": "environment, if the host is in several"})
def check(c, env=None):
    """Host key, docker and compose versions, free disk."""
    run(c, ops.check, env)


@task(help={"dry_run": "list pending migrations, apply nothing",
            "no_backup": "on a protected environment, skip the backup taken first",
            "env": "environment, if the host is in several"})
def migrate(c, dry_run=False, no_backup=False, env=None):
    """Apply pending database migrations (the host must be the environment's db host)."""
    run(c, ops.migrate, env, plan=dry_run, no_backup=no_backup)


@task(name="test", help={"service": "only this service's tests", "env": "environment, if the host is in several"})
def test_(c, service=None, env=None):
    """Run the app's tests against the running environment."""
    run(c, ops.run_tests, env, service=service)


@task(help={"keep": "keep the N newest backups", "env": "environment, if the host is in several"})
def backup(c, keep=None, env=None):
    """Dump the database, verify it, pull it to backups/ENV/ (the host must be the db host)."""
    run(c, ops.backup, env, keep=int(keep) if keep is not None else None)


@task(help={"file": "a local backup (default: the newest verified one)", "yes": "confirm without a prompt",
            "allow_other_env": "allow another environment's backup on a protected environment",
            "env": "environment, if the host is in several"})
def restore(c, file=None, yes=False, allow_other_env=False, env=None):
    """Restore a verified backup into the database."""
    run(c, ops.restore, env, file=file, yes=yes, allow_other_env=allow_other_env)
