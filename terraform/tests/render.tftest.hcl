# Offline checks with a mocked AWS provider (no credentials, no network):
#   terraform init -backend=false && terraform test
# They render the launch template's user data and check the wiring the README promises.

mock_provider "aws" {
  mock_data "aws_ami" {
    defaults = { id = "ami-0123456789abcdef0" }
  }
  mock_data "aws_partition" {
    defaults = { partition = "aws" }
  }
  mock_data "aws_iam_policy_document" {
    defaults = { json = "{\"Version\":\"2012-10-17\",\"Statement\":[]}" }
  }
  mock_resource "aws_elasticache_replication_group" {
    defaults = { primary_endpoint_address = "master.beach-road.abc123.use1.cache.amazonaws.com" }
  }
  mock_resource "aws_lb" {
    defaults = { arn = "arn:aws:elasticloadbalancing:us-east-1:123456789012:loadbalancer/app/beach-road/0123456789abcdef" }
  }
  mock_resource "aws_lb_target_group" {
    defaults = { arn = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/beach-road/0123456789abcdef" }
  }
  mock_resource "aws_launch_template" {
    defaults = { id = "lt-0123456789abcdef0" }
  }
  mock_resource "aws_iam_instance_profile" {
    defaults = { arn = "arn:aws:iam::123456789012:instance-profile/beach-road-instance" }
  }
  mock_resource "aws_secretsmanager_secret" {
    defaults = { arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:beach-road-server-secret-AbCdEf" }
  }
}

# The ALB's subnets, and so the trusted proxies.
override_data {
  target = data.aws_subnet.alb["subnet-0000000000000000a"]
  values = { cidr_block = "10.20.0.0/24" }
}
override_data {
  target = data.aws_subnet.alb["subnet-0000000000000000b"]
  values = { cidr_block = "10.20.1.0/24" }
}

variables {
  vpc_id             = "vpc-0123456789abcdef0"
  public_subnet_ids  = ["subnet-0000000000000000a", "subnet-0000000000000000b"]
  private_subnet_ids = ["subnet-0000000000000000c", "subnet-0000000000000000d"]
  certificate_arn    = "arn:aws:acm:us-east-1:123456789012:certificate/00000000-0000-0000-0000-000000000000"
  domain_name        = "road.example.com"
  binary_url         = "s3://example-artifacts/beach-road/beach-road"
  binary_sha256      = "0000000000000000000000000000000000000000000000000000000000000000"
}

run "s3_binary" {
  command = apply

  assert {
    condition     = strcontains(base64decode(aws_launch_template.road.user_data), "REDIS_URL=rediss://master.beach-road.abc123.use1.cache.amazonaws.com:6379\n")
    error_message = "env file must point REDIS_URL at the ElastiCache primary over TLS"
  }
  assert {
    condition     = strcontains(base64decode(aws_launch_template.road.user_data), "BEACH_SESSION_SERVER=https://road.example.com\n")
    error_message = "env file must carry the public URL"
  }
  assert {
    condition     = strcontains(base64decode(aws_launch_template.road.user_data), "BEACH_ROAD_DRAIN_DELAY=30s\n")
    error_message = "drain delay must reach the env file"
  }
  assert {
    condition     = strcontains(base64decode(aws_launch_template.road.user_data), "TimeoutStopSec=65s")
    error_message = "stop timeout drop-in must be delay + jitter + 30 s"
  }
  assert {
    condition     = strcontains(base64decode(aws_launch_template.road.user_data), file("${path.module}/../deploy/beach-road.service"))
    error_message = "the unit from deploy/ must be installed verbatim"
  }
  assert {
    condition     = strcontains(base64decode(aws_launch_template.road.user_data), "aws s3 cp 's3://example-artifacts/beach-road/beach-road'")
    error_message = "s3:// binaries are fetched with the AWS CLI"
  }
  assert {
    condition     = length(aws_iam_role_policy.binary) == 1
    error_message = "the instance role must be allowed to read the binary"
  }
  assert {
    condition     = aws_lb_target_group.road.deregistration_delay == "30"
    error_message = "deregistration delay must equal the drain delay"
  }
  assert {
    condition     = aws_lb_target_group.road.health_check[0].path == "/ready"
    error_message = "target group must check /ready"
  }
  assert {
    condition     = aws_lb.this.idle_timeout == 3600
    error_message = "ALB idle timeout must allow long WebSockets"
  }
  assert {
    condition     = aws_autoscaling_group.road.health_check_type == "EC2"
    error_message = "the ASG must not replace instances for failing /ready"
  }

  # Redis: noeviction (a full Redis refuses writes instead of evicting live sessions).
  assert {
    condition     = aws_elasticache_parameter_group.redis.family == "redis7" && anytrue([for p in aws_elasticache_parameter_group.redis.parameter : p.name == "maxmemory-policy" && p.value == "noeviction"])
    error_message = "the Redis parameter group must set maxmemory-policy noeviction"
  }
  assert {
    condition     = aws_elasticache_replication_group.redis.parameter_group_name == aws_elasticache_parameter_group.redis.name
    error_message = "the replication group must use the noeviction parameter group"
  }

  # Trusted proxies: the ALB's subnets.
  assert {
    condition     = strcontains(base64decode(aws_launch_template.road.user_data), "BEACH_ROAD_TRUSTED_PROXIES=10.20.0.0/24,10.20.1.0/24\n")
    error_message = "the instances must believe X-Forwarded-For from the ALB's subnets only"
  }

  # Server secret: from Secrets Manager into a root-only file handed over by the drop-in.
  assert {
    condition     = strcontains(base64decode(aws_launch_template.road.user_data), "aws secretsmanager get-secret-value --region 'us-east-1' \\\n      --secret-id 'arn:aws:secretsmanager:us-east-1:123456789012:secret:beach-road-server-secret-AbCdEf'")
    error_message = "user data must fetch the server secret from Secrets Manager"
  }
  assert {
    condition     = strcontains(base64decode(aws_launch_template.road.user_data), "install -m 0600 /dev/null /etc/beach-road/secret\n")
    error_message = "the secret file must be root-only before the secret is written into it"
  }
  assert {
    condition     = strcontains(base64decode(aws_launch_template.road.user_data), file("${path.module}/../deploy/beach-road-secret.conf"))
    error_message = "the secret drop-in from deploy/ must be installed verbatim"
  }
  assert {
    condition     = !strcontains(base64decode(aws_launch_template.road.user_data), "BEACH_ROAD_SECRET=")
    error_message = "no secret value in user data"
  }
  assert {
    condition     = contains(data.aws_iam_policy_document.server_secret.statement[0].actions, "secretsmanager:GetSecretValue") && contains(data.aws_iam_policy_document.server_secret.statement[0].resources, aws_secretsmanager_secret.server_secret.arn)
    error_message = "the instance role may read the server secret, and only it"
  }
  assert {
    condition     = aws_secretsmanager_secret_version.server_secret.secret_string == null && aws_secretsmanager_secret_version.server_secret.secret_string_wo_version == 1
    error_message = "the secret value goes through the write-only argument, never into the state"
  }
  assert {
    condition     = strcontains(base64decode(aws_launch_template.road.user_data), "# 3. The server secret (generation 1)")
    error_message = "the secret's generation must be part of the user data, so that rotating it replaces the instances"
  }
}

run "https_binary_custom_drain" {
  command = apply

  variables {
    binary_url          = "https://artifacts.example.com/beach-road"
    binary_sha256       = ""
    drain_delay_seconds = 45
    extra_env = { BEACH_ROAD_MAX_CONNECTIONS = "30000", REDIS_URL = "redis://ignored",
    BEACH_ROAD_TRUSTED_PROXIES = "0.0.0.0/0" }
    server_secret_version = 2
  }

  assert {
    condition     = strcontains(base64decode(aws_launch_template.road.user_data), "curl -fsSL --retry 5 --retry-connrefused -o \"$tmp/beach-road\" 'https://artifacts.example.com/beach-road'")
    error_message = "https:// binaries are fetched with curl"
  }
  assert {
    condition     = !strcontains(base64decode(aws_launch_template.road.user_data), "sha256sum")
    error_message = "no checksum line without binary_sha256"
  }
  assert {
    condition     = length(aws_iam_role_policy.binary) == 0
    error_message = "no S3 policy for https:// binaries"
  }
  assert {
    condition     = strcontains(base64decode(aws_launch_template.road.user_data), "BEACH_ROAD_MAX_CONNECTIONS=30000\n") && !strcontains(base64decode(aws_launch_template.road.user_data), "redis://ignored") && !strcontains(base64decode(aws_launch_template.road.user_data), "0.0.0.0/0")
    error_message = "extra_env is added but cannot override the wired settings"
  }
  assert {
    condition     = aws_secretsmanager_secret_version.server_secret.secret_string_wo_version == 2 && strcontains(base64decode(aws_launch_template.road.user_data), "# 3. The server secret (generation 2)")
    error_message = "server_secret_version rotates the secret and changes the user data"
  }
  assert {
    condition     = aws_lb_target_group.road.deregistration_delay == "45" && strcontains(base64decode(aws_launch_template.road.user_data), "TimeoutStopSec=80s")
    error_message = "drain delay drives deregistration delay and stop timeout"
  }
}

run "rejects_short_drain" {
  command = plan

  variables {
    drain_delay_seconds = 5
  }

  expect_failures = [var.drain_delay_seconds]
}

run "rejects_secret_in_extra_env" {
  command = plan

  variables {
    extra_env = { BEACH_ROAD_SECRET = "0123456789abcdef0123456789abcdef" }
  }

  expect_failures = [var.extra_env]
}
