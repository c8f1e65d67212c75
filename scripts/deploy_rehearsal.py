#!/usr/bin/env python3
"""Deploy rehearsal: the first half of `sam deploy`, against moto instead of AWS.

`sam deploy` packages the functions (`sam package`: CodeUri becomes an S3 location),
CloudFormation applies the AWS::Serverless-2016-10-31 transform and creates the stack. This
script does the same on a moto server it starts on a free loopback port: the SAM translator
(`aws-sam-translator`, the library `sam validate` and CloudFormation's SAM transform run)
turns template.yaml into plain CloudFormation, a dummy zip stands in for each bootstrap (moto
creates functions, it need not run them), and moto's CloudFormation API creates the stack,
which must reach CREATE_COMPLETE. Then it reads back what moto built (DynamoDB, Lambda, IAM,
SQS, CloudWatch Logs) and checks it against what the code and the README rely on: the stream
and its view type (both tables'), TTL, the two stream mappings (batch size, bisect, retries,
record age, on-failure destination, ReportBatchItemFailures and their filters), each function's environment,
role and log group, each role's statements, the handler's invoke permission, the queue.

moto does not model AWS::ApiGatewayV2::*. The rehearsal therefore replaces the WebSocket API
resource (`WebSocketApi`) with a stack parameter of the same name holding a made-up API id,
so every `!Ref WebSocketApi` / `${WebSocketApi}` (the @connections endpoint, the
ManageConnections ARNs, the invoke permission's SourceArn, alarms, dashboard, outputs)
resolves to that id and is checked, and drops the other ApiGatewayV2 resources (integration,
routes, route responses, stage), which nothing outside the API references except through
DependsOn. Everything else in the template goes to moto as SAM emits it.

It never talks to AWS: every client has endpoint_url set to the local moto server and dummy
credentials. Exit status 0 when every check holds; 1 with the failed checks listed otherwise.

    .venv/bin/python scripts/deploy_rehearsal.py [--template PATH]
"""

from __future__ import annotations

import argparse
import ast
import copy
import io
import json
import logging
import os
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote

REGION = "us-east-1"
# moto's default account id.
ACCOUNT = "123456789012"
STACK = "chat-rehearsal"
# Stands in for the WebSocket API's id (10 lowercase alphanumerics, like API Gateway's).
FAKE_API_ID = "rehearsal0"
APIGW_V2 = "AWS::ApiGatewayV2::"
# Resource types moto's CloudFormation does not create (it has no AWS::ApiGatewayV2::* at all
# and no CloudFormation support for CloudWatch alarms).
UNMODELLED = (APIGW_V2, "AWS::CloudWatch::Alarm")

# Never let a stray boto3 default reach real AWS: dummy credentials, no profile, no IMDS.
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_SESSION_TOKEN="testing",
    AWS_DEFAULT_REGION=REGION,
    AWS_REGION=REGION,
    AWS_EC2_METADATA_DISABLED="true",
    SAM_CLI_TELEMETRY="0",
)
os.environ.pop("AWS_PROFILE", None)

import boto3  # noqa: E402  (after the environment is pinned)
from moto.server import ThreadedMotoServer  # noqa: E402
from samcli.yamlhelper import yaml_parse  # noqa: E402
from samtranslator.public.translator import ManagedPolicyLoader  # noqa: E402
from samtranslator.translator.transform import transform  # noqa: E402


class Checks:
    """Collects failed expectations, so one run reports every broken wire, not just the first."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.passed = 0

    def eq(self, what: str, actual: Any, expected: Any) -> None:
        if actual == expected:
            self.passed += 1
        elif isinstance(actual, dict) and isinstance(expected, dict):
            # Name only the keys that differ: an environment or a role is long.
            keys = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
            differences = "; ".join(f"{k}: expected {expected.get(k)!r}, got {actual.get(k)!r}" for k in keys)
            self.failures.append(f"{what}: {differences}")
        else:
            self.failures.append(f"{what}: expected {expected!r}, got {actual!r}")

    def true(self, what: str, condition: bool, detail: Any = None) -> None:
        if condition:
            self.passed += 1
        else:
            self.failures.append(f"{what}" + (f" ({detail!r})" if detail is not None else ""))


# ---------------------------------------------------------------------------------------------
# Template: package, transform, stub the WebSocket API
# ---------------------------------------------------------------------------------------------


def references(node: Any) -> set[str]:
    """Logical ids a template fragment points at (Ref, Fn::GetAtt, ${...} in Fn::Sub)."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "Ref" and isinstance(value, str):
                found.add(value)
            elif key == "Fn::GetAtt":
                target = value[0] if isinstance(value, list) else str(value).split(".")[0]
                found.add(target)
            elif key == "Fn::Sub":
                text = value[0] if isinstance(value, list) else value
                local = set(value[1].keys()) if isinstance(value, list) and len(value) > 1 else set()
                for part in str(text).split("${")[1:]:
                    name = part.split("}")[0].split(".")[0]
                    if not name.startswith("!") and name not in local:
                        found.add(name)
            found |= references(value)
    elif isinstance(node, list):
        for item in node:
            found |= references(item)
    return found


def package(sam: dict[str, Any], bucket: str, key: str) -> dict[str, Any]:
    """What `sam package` does to each function: CodeUri becomes the uploaded artifact."""
    sam = copy.deepcopy(sam)
    for resource in sam["Resources"].values():
        if resource.get("Type") == "AWS::Serverless::Function":
            resource["Properties"]["CodeUri"] = {"Bucket": bucket, "Key": key}
    return sam


def stub_unmodelled(cfn: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Remove what moto's CloudFormation cannot create (see the module doc)."""
    cfn = copy.deepcopy(cfn)
    resources = cfn["Resources"]
    apis = [name for name, r in resources.items() if r["Type"] == f"{APIGW_V2}Api"]
    if len(apis) != 1:
        raise SystemExit(f"expected exactly one {APIGW_V2}Api, found {apis}")
    (api,) = apis
    dropped = {name for name, r in resources.items() if r["Type"].startswith(UNMODELLED)}
    # The dashboard names every alarm's ARN; without the alarms it cannot be created either.
    dropped |= {name for name, r in resources.items() if r["Type"] == "AWS::CloudWatch::Dashboard"}
    for name in dropped:
        del resources[name]
    for name, resource in resources.items():
        depends = resource.get("DependsOn")
        if depends is not None:
            depends = [depends] if isinstance(depends, str) else depends
            kept = [d for d in depends if d not in dropped]
            if kept:
                resource["DependsOn"] = kept
            else:
                del resource["DependsOn"]
        # Only the API itself may be referenced from what stays: a reference to a route, the
        # stage or an alarm would be silently lost here, so refuse.
        lost = (references(resource) & dropped) - {api}
        if lost:
            raise SystemExit(f"{name} references {sorted(lost)}, which the rehearsal cannot stub")
    for name, output in cfn.get("Outputs", {}).items():
        lost = (references(output) & dropped) - {api}
        if lost:
            raise SystemExit(f"output {name} references {sorted(lost)}")
    cfn.setdefault("Parameters", {})[api] = {
        "Type": "String",
        "Default": FAKE_API_ID,
        "Description": "Deploy rehearsal: stands in for the WebSocket API's id (moto has no ApiGatewayV2).",
    }
    return cfn, sorted(dropped)


def dummy_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        # moto stores the code; nothing runs it. A shell script keeps the zip honest about that.
        archive.writestr("bootstrap", "#!/bin/sh\necho 'deploy rehearsal: not a real bootstrap' >&2\nexit 1\n")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Checks against the template's intent
# ---------------------------------------------------------------------------------------------


def statements(document: Any) -> list[dict[str, Any]]:
    if isinstance(document, str):
        document = unquote(document)
        try:
            document = json.loads(document)
        except json.JSONDecodeError:
            # moto keeps an inline role policy created through CloudFormation as the Python
            # repr of the template's dict, not as JSON.
            document = ast.literal_eval(document)
    result = document["Statement"]
    return result if isinstance(result, list) else [result]


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def check_stack(clients: dict[str, Any], sam: dict[str, Any], c: Checks) -> None:
    cfn, ddb, lam, iam, sqs, logs = (
        clients[n] for n in ("cloudformation", "dynamodb", "lambda", "iam", "sqs", "logs")
    )
    defaults = {name: str(p.get("Default", "")) for name, p in sam["Parameters"].items()}
    physical = {
        r["LogicalResourceId"]: r["PhysicalResourceId"]
        for page in cfn.get_paginator("list_stack_resources").paginate(StackName=STACK)
        for r in page["StackResourceSummaries"]
    }
    wanted = [
        "EventsTable", "ConnectionsTable",
        "ChatApiHandlerFunction", "ChatApiHandlerFunctionRole", "ChatApiHandlerInvokePermission",
        "ChatApiHandlerLogGroup",
        "FanoutFunction", "FanoutFunctionRole", "FanoutFunctionStream", "FanoutFunctionExpiryStream",
        "FanoutLogGroup",
        "FanoutDeadLetterQueue",
    ]  # fmt: skip
    for name in wanted:
        c.true(f"stack has {name}", name in physical, sorted(physical))
    if any(name not in physical for name in wanted):
        return

    # --- Tables ---------------------------------------------------------------------------
    events = ddb.describe_table(TableName=physical["EventsTable"])["Table"]
    connections = ddb.describe_table(TableName=physical["ConnectionsTable"])["Table"]
    c.eq("events table key", events["KeySchema"],
         [{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "seq", "KeyType": "RANGE"}])
    c.eq("connections table key", connections["KeySchema"],
         [{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}])
    c.eq("events stream", events.get("StreamSpecification"),
         {"StreamEnabled": True, "StreamViewType": "NEW_IMAGE"})
    # The old image of a connection's TTL deletion carries the rooms its expiry leaves.
    c.eq("connections stream", connections.get("StreamSpecification"),
         {"StreamEnabled": True, "StreamViewType": "OLD_IMAGE"})
    for label, table in (("events", events), ("connections", connections)):
        c.eq(f"{label} table billing", table.get("BillingModeSummary", {}).get("BillingMode"), "PAY_PER_REQUEST")
    stream_arn = events["LatestStreamArn"]
    conn_stream_arn = connections.get("LatestStreamArn")

    # --- Queue ----------------------------------------------------------------------------
    queue = sqs.get_queue_attributes(QueueUrl=physical["FanoutDeadLetterQueue"], AttributeNames=["All"])["Attributes"]
    queue_arn = queue["QueueArn"]
    c.eq("on-failure queue retention (s)", queue.get("MessageRetentionPeriod"), "1209600")
    c.eq("on-failure queue SSE", queue.get("SqsManagedSseEnabled"), "true")

    # --- Functions ------------------------------------------------------------------------
    handler = lam.get_function_configuration(FunctionName=physical["ChatApiHandlerFunction"])
    fanout = lam.get_function_configuration(FunctionName=physical["FanoutFunction"])
    common_env = {
        "EVENTS_TABLE": events["TableName"],
        "CONNECTIONS_TABLE": connections["TableName"],
        "EVENT_RETENTION_DAYS": defaults["EventRetentionDays"],
        # Both: the fan-out stops broadcasting presence past it, the handler's joins turn
        # unsequenced past it.
        "PRESENCE_BROADCAST_LIMIT": defaults["PresenceBroadcastLimit"],
        "RUST_LOG": defaults["LogLevel"],
        "METRICS_NAMESPACE": f"ServerlessChat/{STACK}",
    }
    expected_env = {
        "ChatApiHandlerFunction": {
            **common_env,
            "MAX_MESSAGE_BYTES": defaults["MaxMessageBytes"],
            "RATE_LIMIT_PER_SECOND": defaults["RateLimitPerSecond"],
            "RATE_LIMIT_BURST": defaults["RateLimitBurst"],
            "AUTH_JWT_SECRET": defaults["AuthJwtSecret"],
            "CONNECTION_TTL_SECONDS": defaults["ConnectionTtlSeconds"],
            "MAX_ROOMS": defaults["MaxRooms"],
            "PRINCIPAL_MAX_CONNECTIONS": defaults["PrincipalMaxConnections"],
            "PRINCIPAL_RATE_PER_SECOND": defaults["PrincipalRatePerSecond"],
            "ROOM_PRESENCE_POSTS_PER_SECOND": defaults["RoomPresencePostsPerSecond"],
        },
        "FanoutFunction": {
            **common_env,
            # The Management API of this API's stage: what fanout posts frames to.
            "CONNECTIONS_ENDPOINT": f"https://{FAKE_API_ID}.execute-api.{REGION}.amazonaws.com/{defaults['StageName']}",
            "FANOUT_CONCURRENCY": defaults["FanoutConcurrency"],
            "FANOUT_MAX_RPS": defaults["FanoutMaxRps"],
        },
    }
    shape = {
        "ChatApiHandlerFunction": (handler, 256, 10, "ChatApiHandlerLogGroup"),
        "FanoutFunction": (fanout, 512, 60, "FanoutLogGroup"),
    }
    for name, (config, memory, timeout, log_group) in shape.items():
        # moto keeps Number parameters as numbers; Lambda's environment holds strings only.
        env = {k: str(v) for k, v in config.get("Environment", {}).get("Variables", {}).items()}
        c.eq(f"{name} environment", env, expected_env[name])
        c.eq(f"{name} runtime", config.get("Runtime"), "provided.al2023")
        c.eq(f"{name} handler", config.get("Handler"), "bootstrap")
        c.eq(f"{name} memory (MB)", config.get("MemorySize"), memory)
        c.eq(f"{name} timeout (s)", config.get("Timeout"), timeout)
    for log_group in ("ChatApiHandlerLogGroup", "FanoutLogGroup"):
        found = logs.describe_log_groups(logGroupNamePrefix=physical[log_group])["logGroups"]
        c.eq(f"{log_group} retention (days)", [g.get("retentionInDays") for g in found], [30])

    # --- The stream mappings --------------------------------------------------------------
    # The fan-out must see every event and redelivery item (INSERT/MODIFY whose new image is
    # not the room's counter) and every REMOVE of a non-counter item (keys only, seq != 0);
    # Lambda ORs the filters. Of the connections table it must see only TTL deletions of
    # connection items (REMOVE by the DynamoDB service, key CONN#.../CONN): every request
    # writes that table, and $disconnect's own delete must not run the expiry path.
    mappings = {
        "FanoutFunctionStream": (stream_arn, [
            {"dynamodb": {"NewImage": {"type": {"S": [{"anything-but": ["Counter"]}]}}}},
            {"dynamodb": {"Keys": {"seq": {"N": [{"anything-but": ["0"]}]}}}},
        ]),
        "FanoutFunctionExpiryStream": (conn_stream_arn, [
            {"eventName": ["REMOVE"],
             "userIdentity": {"type": ["Service"], "principalId": ["dynamodb.amazonaws.com"]},
             "dynamodb": {"Keys": {"pk": {"S": [{"prefix": "CONN#"}]}, "sk": {"S": ["CONN"]}}}},
        ]),
    }  # fmt: skip
    for logical, (source, filters) in mappings.items():
        mapping = lam.get_event_source_mapping(UUID=physical[logical])
        c.eq(f"{logical} source", mapping.get("EventSourceArn"), source)
        c.eq(f"{logical} function", mapping.get("FunctionArn"), fanout["FunctionArn"])
        c.eq(f"{logical} starting position", mapping.get("StartingPosition"), "LATEST")
        c.eq(f"{logical} batch size", mapping.get("BatchSize"), 100)
        window = int(defaults["EventsBatchingWindowSeconds"]) if logical == "FanoutFunctionStream" else 0
        c.eq(f"{logical} batching window (s)", mapping.get("MaximumBatchingWindowInSeconds"), window)
        c.eq(f"{logical} parallelization factor", mapping.get("ParallelizationFactor"), 1)
        c.eq(f"{logical} bisects on error", mapping.get("BisectBatchOnFunctionError"), True)
        c.eq(f"{logical} retries", mapping.get("MaximumRetryAttempts"), 5)
        c.eq(f"{logical} maximum record age (s)", mapping.get("MaximumRecordAgeInSeconds"), 3600)
        c.eq(f"{logical} on-failure destination", mapping.get("DestinationConfig"),
             {"OnFailure": {"Destination": queue_arn}})
        c.eq(f"{logical} response types", mapping.get("FunctionResponseTypes"), ["ReportBatchItemFailures"])
        patterns = [json.loads(f["Pattern"]) for f in mapping.get("FilterCriteria", {}).get("Filters", [])]
        c.eq(f"{logical} filters", patterns, filters)

    # --- Roles ----------------------------------------------------------------------------
    tables = sorted([events["TableArn"], connections["TableArn"]])
    rw = ["dynamodb:ConditionCheckItem", "dynamodb:DeleteItem", "dynamodb:GetItem",
          "dynamodb:PutItem", "dynamodb:Query", "dynamodb:UpdateItem"]  # fmt: skip
    stage = defaults["StageName"]
    api_arn = f"arn:aws:execute-api:{REGION}:{ACCOUNT}:{FAKE_API_ID}/{stage}"
    # DescribeLogGroups ends the ARN in ":*"; Fn::GetAtt LogGroup.Arn (what the role names) does
    # on AWS too, and does not in moto: compare without it.
    log_group_arn = logs.describe_log_groups(logGroupNamePrefix=physical["FanoutLogGroup"])["logGroups"][0]["arn"]
    log_group_arn = log_group_arn.removesuffix(":*")
    expected_roles = {
        "ChatApiHandlerFunctionRole": {
            "ChatTablesReadWrite": (rw, tables),
        },
        "FanoutFunctionRole": {
            "Logs": (["logs:CreateLogStream", "logs:PutLogEvents"], [log_group_arn]),
            "ReadEventsStream": (["dynamodb:DescribeStream", "dynamodb:GetRecords", "dynamodb:GetShardIterator"],
                                 sorted([stream_arn, conn_stream_arn or "<no connections stream>"])),
            "ChatTablesReadWrite": (sorted(rw + ["dynamodb:BatchWriteItem"]), tables),
            "ManageConnections": (["execute-api:ManageConnections"],
                                  sorted(f"{api_arn}/{verb}/@connections/*" for verb in ("POST", "GET", "DELETE"))),
            "DeadLetterQueue": (["sqs:SendMessage"], [queue_arn]),
        },
    }  # fmt: skip
    function_of_role = {"ChatApiHandlerFunctionRole": handler, "FanoutFunctionRole": fanout}
    for role_name, expected in expected_roles.items():
        role = iam.get_role(RoleName=physical[role_name])["Role"]
        c.eq(f"{role_name} is the function's role", function_of_role[role_name].get("Role"), role["Arn"])
        trust = statements(role["AssumeRolePolicyDocument"])
        c.eq(f"{role_name} trust", [(s.get("Principal"), s.get("Action")) for s in trust],
             [({"Service": ["lambda.amazonaws.com"]} if isinstance(trust[0].get("Principal", {}).get("Service"), list)
               else {"Service": "lambda.amazonaws.com"}, ["sts:AssumeRole"] if isinstance(trust[0].get("Action"), list)
               else "sts:AssumeRole")])
        found: dict[str, tuple[list[str], list[str]]] = {}
        for policy in iam.list_role_policies(RoleName=role["RoleName"])["PolicyNames"]:
            document = iam.get_role_policy(RoleName=role["RoleName"], PolicyName=policy)["PolicyDocument"]
            for s in statements(document):
                c.eq(f"{role_name} {s.get('Sid')} effect", s.get("Effect"), "Allow")
                c.true(f"{role_name} {s.get('Sid')} names no wildcard resource",
                       "*" not in as_list(s.get("Resource")), s.get("Resource"))
                resources = sorted(r.removesuffix(":*") if ":log-group:" in r else r for r in as_list(s["Resource"]))
                found[s.get("Sid", "?")] = (sorted(as_list(s["Action"])), resources)
        c.eq(f"{role_name} statements", found, expected)

    # --- Who may invoke the handler -------------------------------------------------------
    policy = json.loads(lam.get_policy(FunctionName=physical["ChatApiHandlerFunction"])["Policy"])
    grants = [
        (s.get("Principal"), s.get("Action"), s.get("Condition", {}).get("ArnLike", {}).get("AWS:SourceArn"))
        for s in policy["Statement"]
    ]
    c.eq("handler invoke permission", grants,
         [({"Service": "apigateway.amazonaws.com"}, "lambda:InvokeFunction", f"{api_arn}/*")])
    c.true("fan-out has no resource policy (only its stream mapping invokes it)",
           not _has_policy(lam, physical["FanoutFunction"]))

    # --- Outputs resolve ------------------------------------------------------------------
    outputs = {o["OutputKey"]: o["OutputValue"] for o in cfn.describe_stacks(StackName=STACK)["Stacks"][0]["Outputs"]}
    c.eq("EventsTableStreamArn output", outputs.get("EventsTableStreamArn"), stream_arn)
    c.eq("FanoutFunctionArn output", outputs.get("FanoutFunctionArn"), fanout["FunctionArn"])
    c.eq("ConnectionURL output", outputs.get("ConnectionURL"),
         f"{expected_env['FanoutFunction']['CONNECTIONS_ENDPOINT']}/@connections")


def check_unmodelled_properties(cfn: dict[str, Any], c: Checks) -> None:
    """What moto's CloudFormation accepts but drops, checked in the transformed template.

    moto 5.2 creates tables without their TimeToLiveSpecification, functions without
    Architectures and LoggingConfig, and roles without ManagedPolicyArns, so reading them back
    would test moto. These are checked in what CloudFormation would be given instead (after
    the SAM transform, where Globals are merged and the handler's role is generated).
    """
    resources = cfn["Resources"]
    for table in ("EventsTable", "ConnectionsTable"):
        c.eq(f"{table} TimeToLiveSpecification (template)",
             resources[table]["Properties"].get("TimeToLiveSpecification"),
             {"AttributeName": "expiresAt", "Enabled": True})
    for function, log_group in (("ChatApiHandlerFunction", "ChatApiHandlerLogGroup"), ("FanoutFunction", "FanoutLogGroup")):
        properties = resources[function]["Properties"]
        c.eq(f"{function} Architectures (template)", properties.get("Architectures"), ["arm64"])
        c.eq(f"{function} LoggingConfig (template)", properties.get("LoggingConfig"),
             {"LogGroup": {"Ref": log_group}, "LogFormat": "JSON", "ApplicationLogLevel": "DEBUG"})
    # SAM attaches the basic execution role (logs) to the role it generates for the handler; the
    # fan-out's own role grants logs on its log group only and attaches nothing (no
    # AWSLambdaDynamoDBExecutionRole, whose stream reads are on "*").
    managed = resources["ChatApiHandlerFunctionRole"]["Properties"].get("ManagedPolicyArns", [])
    c.eq("ChatApiHandlerFunctionRole ManagedPolicyArns (template)", managed,
         ["arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole"])
    c.eq("FanoutFunctionRole ManagedPolicyArns (template)",
         resources["FanoutFunctionRole"]["Properties"].get("ManagedPolicyArns"), None)  # fmt: skip


def _has_policy(lam: Any, function: str) -> bool:
    try:
        return bool(json.loads(lam.get_policy(FunctionName=function)["Policy"]).get("Statement"))
    except lam.exceptions.ResourceNotFoundException:
        return False


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = Path(__file__).resolve().parent.parent
    parser.add_argument("--template", type=Path, default=root / "template.yaml")
    args = parser.parse_args()

    # moto's request log and its "not supported" warnings for the resources dropped above.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Tried to parse")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server._server.server_address[:2]  # port 0: the OS picked a free one
        endpoint = f"http://{host}:{port}"
        print(f"moto on {endpoint}")
        clients = {
            name: boto3.client(name, endpoint_url=endpoint, region_name=REGION)
            for name in ("cloudformation", "dynamodb", "lambda", "iam", "sqs", "logs", "s3")
        }

        sam = yaml_parse(args.template.read_text())
        bucket, key = "rehearsal-artifacts", "bootstrap.zip"
        clients["s3"].create_bucket(Bucket=bucket)
        clients["s3"].put_object(Bucket=bucket, Key=key, Body=dummy_zip())

        translated = transform(
            package(sam, bucket, key), {}, ManagedPolicyLoader(clients["iam"])
        )
        cfn_template, dropped = stub_unmodelled(translated)
        print(f"SAM transform: {len(translated['Resources'])} resources; "
              f"not modelled by moto, dropped: {', '.join(dropped)}; "
              f"WebSocketApi stubbed as a parameter (api id {FAKE_API_ID!r})")  # fmt: skip

        cloudformation = clients["cloudformation"]
        cloudformation.create_stack(
            StackName=STACK,
            TemplateBody=json.dumps(cfn_template),
            Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM", "CAPABILITY_AUTO_EXPAND"],
        )
        cloudformation.get_waiter("stack_create_complete").wait(
            StackName=STACK, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
        )
        stack = cloudformation.describe_stacks(StackName=STACK)["Stacks"][0]
        print(f"stack {STACK}: {stack['StackStatus']}")
        if stack["StackStatus"] != "CREATE_COMPLETE":
            for event in cloudformation.describe_stack_events(StackName=STACK)["StackEvents"]:
                print(f"  {event['LogicalResourceId']}: {event['ResourceStatus']} {event.get('ResourceStatusReason', '')}")
            return 1

        checks = Checks()
        check_stack(clients, sam, checks)
        check_unmodelled_properties(cfn_template, checks)
        if checks.failures:
            print(f"deploy rehearsal FAILED: {len(checks.failures)} of "
                  f"{len(checks.failures) + checks.passed} checks", file=sys.stderr)  # fmt: skip
            for failure in checks.failures:
                print(f"  - {failure}", file=sys.stderr)
            return 1
        print(f"deploy rehearsal passed: {checks.passed} checks")
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
