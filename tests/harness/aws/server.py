"""Child-process entry of the AWS simulator (EC2 + STS through moto, EBS direct model)::

    python -m tests.harness.aws.server --port P --data DIR --access-key K --secret-key S

Serves one WSGI app on 127.0.0.1:P (threaded) and writes ``DIR/ready.json`` once it
answers. Everything lives under DIR: ``volumes/`` (volume files), ``ebs/blobs/`` (snapshot
block data), ``amis.json`` (the one base image moto loads).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from types import FrameType

BASE_AMI = "ami-0b5e0000000000001"  # the image tests launch instances from


def _write_amis(path: Path) -> None:
    path.write_text(json.dumps([{
        "ami_id": BASE_AMI, "name": "transcend-test-base", "description": "harness base image",
        "owner_id": "137112412989", "public": True,  # Amazon-owned: not in Owners=["self"]
        "virtualization_type": "hvm",
        "architecture": "x86_64", "state": "available", "root_device_type": "ebs",
        "root_device_name": "/dev/xvda", "boot_mode": "uefi",
    }]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--access-key", required=True)
    p.add_argument("--secret-key", required=True)
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args(argv)

    data: Path = args.data.resolve()
    data.mkdir(parents=True, exist_ok=True)
    account = os.environ.get("MOTO_ACCOUNT_ID", "123456789012")
    amis = data / "amis.json"
    _write_amis(amis)
    # moto reads these when its modules are imported: set them first
    os.environ["MOTO_AMIS_PATH"] = str(amis)
    os.environ.setdefault("MOTO_ACCOUNT_ID", account)

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    from tests.harness.aws.app import Config, SimApp
    from tests.harness.aws.ebs_model import EbsModel
    from tests.harness.aws.ec2_join import Ec2Join

    model = EbsModel(data / "ebs", owner_id=account, region=args.region)
    join = Ec2Join(model, data, account, args.region)
    join.install()
    join.warm_up()
    moto_app = DomainDispatcherApplication(create_backend_app)
    app = SimApp(Config(access_key=args.access_key, secret_key=args.secret_key,
                        region=args.region, account=account), model, join, moto_app)
    server = make_server(args.host, args.port, app, threaded=True,
                         request_handler=MotoRequestHandler)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    ready = data / "ready.json"
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(json.dumps({"host": args.host, "port": server.server_address[1],
                               "pid": os.getpid(), "region": args.region, "account": account,
                               "base_ami": BASE_AMI}))
    os.replace(tmp, ready)
    print(f"aws simulator listening on http://{args.host}:{server.server_address[1]} "
          f"(data {data})", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
