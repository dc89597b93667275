# Offline checks with a mocked AWS provider (no credentials, no network once `terraform init` has
# fetched the providers):
#   terraform init -backend=false && terraform test
# They render the launch template's user data and check the wiring the README promises. The user
# data is gzip-compressed in the launch template, so most checks read local.user_data (the
# script) and one checks that the launch template carries exactly that, compressed.

mock_provider "aws" {
  mock_data "aws_ami" {
    defaults = { id = "ami-0123456789abcdef0" }
  }
  mock_data "aws_partition" {
    defaults = { partition = "aws", dns_suffix = "amazonaws.com" }
  }
  mock_data "aws_caller_identity" {
    defaults = { account_id = "123456789012" }
  }
  mock_data "aws_elb_service_account" {
    defaults = { arn = "arn:aws:iam::127311923021:root" }
  }
  mock_data "aws_ec2_managed_prefix_list" {
    defaults = { id = "pl-63a5400a" }
  }
  mock_data "aws_route_table" {
    defaults = { id = "rtb-0123456789abcdef0" }
  }
  mock_data "aws_iam_policy_document" {
    defaults = { json = "{\"Version\":\"2012-10-17\",\"Statement\":[]}" }
  }
  mock_resource "aws_elasticache_replication_group" {
    defaults = { primary_endpoint_address = "master.beach-road.abc123.use1.cache.amazonaws.com" }
  }
  mock_resource "aws_lb" {
    defaults = {
      arn        = "arn:aws:elasticloadbalancing:us-east-1:123456789012:loadbalancer/app/beach-road/0123456789abcdef"
      arn_suffix = "app/beach-road/0123456789abcdef"
    }
  }
  mock_resource "aws_lb_target_group" {
    defaults = {
      arn        = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/beach-road/0123456789abcdef"
      arn_suffix = "targetgroup/beach-road/0123456789abcdef"
    }
  }
  mock_resource "aws_lb_listener" {
    defaults = { arn = "arn:aws:elasticloadbalancing:us-east-1:123456789012:listener/app/beach-road/0123456789abcdef/0123456789abcdef" }
  }
  mock_resource "aws_kms_key" {
    defaults = { arn = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000001" }
  }
  mock_resource "aws_sns_topic" {
    defaults = { arn = "arn:aws:sns:us-east-1:123456789012:beach-road-alarms" }
  }
  mock_resource "aws_cloudwatch_log_group" {
    defaults = { arn = "arn:aws:logs:us-east-1:123456789012:log-group:/beach-road/beach-road" }
  }
  mock_resource "aws_s3_bucket" {
    defaults = { id = "beach-road-alb-logs-0001", arn = "arn:aws:s3:::beach-road-alb-logs-0001" }
  }
  mock_resource "aws_vpc_endpoint" {
    defaults = { prefix_list_id = "pl-63a5400a" }
  }
  mock_resource "aws_wafv2_web_acl" {
    defaults = { arn = "arn:aws:wafv2:us-east-1:123456789012:regional/webacl/beach-road/00000000-0000-0000-0000-000000000002" }
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

  # The two secrets get different ARNs, so that the checks can tell them apart.
  override_resource {
    target = aws_secretsmanager_secret.redis_auth[0]
    values = { arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:beach-road-redis-auth-GhIjKl" }
  }

  assert {
    condition     = aws_launch_template.road.user_data == base64gzip(local.user_data)
    error_message = "the launch template carries the rendered script, gzip-compressed"
  }
  assert {
    condition     = strcontains(local.user_data, "BEACH_SESSION_SERVER=https://road.example.com\n")
    error_message = "env file must carry the public URL"
  }
  assert {
    condition     = strcontains(local.user_data, "BEACH_ROAD_LOG_FORMAT=json\n")
    error_message = "the servers log JSON lines"
  }
  assert {
    condition     = strcontains(local.user_data, "BEACH_ROAD_DRAIN_DELAY=30s\n")
    error_message = "drain delay must reach the env file"
  }
  assert {
    condition     = strcontains(local.user_data, "TimeoutStopSec=65s")
    error_message = "stop timeout drop-in must be delay + jitter + 30 s"
  }
  assert {
    condition     = strcontains(local.user_data, file("${path.module}/../deploy/beach-road.service"))
    error_message = "the unit from deploy/ must be installed verbatim"
  }
  assert {
    condition     = strcontains(local.user_data, file("${path.module}/templates/aws_fetch.py"))
    error_message = "the boot helper must be installed verbatim"
  }
  assert {
    condition     = strcontains(local.user_data, "\"$fetch\" s3 'us-east-1' 'amazonaws.com' 'example-artifacts' 'beach-road/beach-road' \"$tmp/beach-road\"\n")
    error_message = "s3:// binaries are fetched with the boot helper and the instance role"
  }
  assert {
    condition     = !strcontains(local.user_data, "apt-get") && !strcontains(local.user_data, "awscli")
    error_message = "the boot installs nothing from a Debian mirror (no internet egress)"
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

  # Healing: ELB health checks, launch before terminate, refresh gated by alarms with rollback.
  assert {
    condition     = aws_autoscaling_group.road.health_check_type == "ELB" && aws_autoscaling_group.road.health_check_grace_period == 300
    error_message = "the ASG replaces instances that the target group finds not ready, after a grace period"
  }
  assert {
    condition     = aws_autoscaling_group.road.instance_maintenance_policy[0].min_healthy_percentage == 100 && aws_autoscaling_group.road.instance_maintenance_policy[0].max_healthy_percentage == 200
    error_message = "replacements are launched before the instances they replace are terminated"
  }
  assert {
    condition = (aws_autoscaling_group.road.instance_refresh[0].preferences[0].auto_rollback == true
      && aws_autoscaling_group.road.instance_refresh[0].preferences[0].min_healthy_percentage == 100
      && join(",", aws_autoscaling_group.road.instance_refresh[0].preferences[0].checkpoint_percentages) == "50,100"
    && tostring(aws_autoscaling_group.road.instance_refresh[0].preferences[0].checkpoint_delay) == "300")
    error_message = "the instance refresh has checkpoints, keeps full capacity and rolls back"
  }
  assert {
    condition = (toset(aws_autoscaling_group.road.instance_refresh[0].preferences[0].alarm_specification[0].alarms)
    == toset(["beach-road-unhealthy-hosts", "beach-road-elb-5xx", "beach-road-target-5xx"]))
    error_message = "the refresh is gated on the unhealthy-hosts and 5xx alarms"
  }
  assert {
    condition     = aws_autoscaling_policy.cpu.policy_type == "TargetTrackingScaling" && aws_autoscaling_policy.cpu.target_tracking_configuration[0].predefined_metric_specification[0].predefined_metric_type == "ASGAverageCPUUtilization"
    error_message = "a target tracking policy moves the group between min and max"
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

  # Single-node mode (the default): one primary and a replica, no cluster-enabled parameter.
  assert {
    condition = (aws_elasticache_replication_group.redis.num_cache_clusters == 2
      && aws_elasticache_replication_group.redis.automatic_failover_enabled && aws_elasticache_replication_group.redis.multi_az_enabled
      && aws_elasticache_parameter_group.redis.name == "beach-road-redis7"
    && !anytrue([for p in aws_elasticache_parameter_group.redis.parameter : p.name == "cluster-enabled"]))
    error_message = "single-node mode: redis_num_nodes nodes with failover, a parameter group without cluster-enabled"
  }
  assert {
    condition     = output.redis_endpoint == "master.beach-road.abc123.use1.cache.amazonaws.com" && output.redis_primary_endpoint == output.redis_endpoint && terraform_data.redis_mode.output == "single"
    error_message = "single-node mode: the primary endpoint is the one to use"
  }

  # Redis AUTH: a random token, in Secrets Manager, composed into REDIS_URL at boot only.
  assert {
    condition     = aws_elasticache_replication_group.redis.transit_encryption_enabled == true && aws_elasticache_replication_group.redis.auth_token == random_password.redis_auth[0].result
    error_message = "Redis has TLS and AUTH with the generated token"
  }
  assert {
    condition     = aws_secretsmanager_secret_version.redis_auth[0].secret_string == random_password.redis_auth[0].result && aws_secretsmanager_secret.redis_auth[0].kms_key_id == aws_kms_key.this.arn
    error_message = "the token is stored in a KMS-encrypted secret"
  }
  assert {
    condition     = strcontains(local.user_data, "\"$fetch\" redis-env 'us-east-1' 'amazonaws.com' 'arn:aws:secretsmanager:us-east-1:123456789012:secret:beach-road-redis-auth-GhIjKl' 'master.beach-road.abc123.use1.cache.amazonaws.com' '6379' /etc/beach-road/redis.env\n")
    error_message = "user data composes REDIS_URL from the token secret and the primary endpoint"
  }
  assert {
    condition     = strcontains(local.user_data, "install -m 0600 /dev/null /etc/beach-road/redis.env\n") && strcontains(local.user_data, "\nEnvironmentFile=/etc/beach-road/redis.env\n")
    error_message = "the Redis URL lives in a root-only file that a drop-in hands to systemd"
  }
  assert {
    condition     = !can(regex("(?m)^REDIS_URL=", local.user_data)) && !strcontains(local.user_data, nonsensitive(random_password.redis_auth[0].result))
    error_message = "neither REDIS_URL nor the token is in the user data"
  }

  # Trusted proxies: the ALB's subnets.
  assert {
    condition     = strcontains(local.user_data, "BEACH_ROAD_TRUSTED_PROXIES=10.20.0.0/24,10.20.1.0/24\n")
    error_message = "the instances must believe X-Forwarded-For from the ALB's subnets only"
  }

  # Server secret: from Secrets Manager into a root-only file handed over by the drop-in.
  assert {
    condition     = strcontains(local.user_data, "\"$fetch\" secret 'us-east-1' 'amazonaws.com' 'arn:aws:secretsmanager:us-east-1:123456789012:secret:beach-road-server-secret-AbCdEf' /etc/beach-road/secret 32\n")
    error_message = "user data must fetch the server secret from Secrets Manager"
  }
  assert {
    condition     = strcontains(local.user_data, "install -m 0600 /dev/null /etc/beach-road/secret\n")
    error_message = "the secret file must be root-only before the secret is written into it"
  }
  assert {
    condition     = strcontains(local.user_data, file("${path.module}/../deploy/beach-road-secret.conf"))
    error_message = "the secret drop-in from deploy/ must be installed verbatim"
  }
  assert {
    condition     = !strcontains(local.user_data, "BEACH_ROAD_SECRET=")
    error_message = "no secret value in user data"
  }
  assert {
    condition = (contains(data.aws_iam_policy_document.secrets.statement[0].actions, "secretsmanager:GetSecretValue")
    && toset(data.aws_iam_policy_document.secrets.statement[0].resources) == toset([aws_secretsmanager_secret.server_secret.arn, aws_secretsmanager_secret.redis_auth[0].arn]))
    error_message = "the instance role may read the two secrets, and only them"
  }
  assert {
    condition     = aws_secretsmanager_secret_version.server_secret.secret_string == null && aws_secretsmanager_secret_version.server_secret.secret_string_wo_version == 1
    error_message = "the secret value goes through the write-only argument, never into the state"
  }
  assert {
    condition     = strcontains(local.user_data, "# - the server secret (generation 1)")
    error_message = "the secret's generation must be part of the user data, so that rotating it replaces the instances"
  }
  assert {
    condition     = aws_secretsmanager_secret.server_secret.kms_key_id == aws_kms_key.this.arn && aws_elasticache_replication_group.redis.kms_key_id == aws_kms_key.this.arn
    error_message = "secrets and Redis at rest use the stack's KMS key"
  }

  # Egress: Redis, the VPC endpoints, S3's prefix list; nothing to the internet.
  assert {
    condition = (aws_vpc_security_group_egress_rule.instance_to_endpoints.referenced_security_group_id == aws_security_group.endpoints[0].id
      && aws_vpc_security_group_egress_rule.instance_to_s3.prefix_list_id == "pl-63a5400a"
    && length(aws_vpc_security_group_egress_rule.instance_extra_https) == 0)
    error_message = "instances reach HTTPS only through the VPC endpoints"
  }
  assert {
    condition     = toset(keys(aws_vpc_endpoint.interface)) == toset(["secretsmanager", "logs", "ssm", "ssmmessages", "ec2messages"]) && length(aws_vpc_endpoint.s3) == 1
    error_message = "the endpoints the boot and the agents need exist"
  }
  assert {
    condition     = strcontains(local.user_data, "amazon-ssm-agent.deb") && strcontains(local.user_data, "amazon-cloudwatch-agent.deb")
    error_message = "the agents come from the region's S3 buckets"
  }

  # Public /metrics is refused at the ALB.
  assert {
    condition     = aws_lb_listener_rule.no_public_metrics.action[0].fixed_response[0].status_code == "404" && anytrue([for c in aws_lb_listener_rule.no_public_metrics.condition : contains(c.path_pattern[0].values, "/metrics")])
    error_message = "the public listener must not forward /metrics"
  }

  # Alarms, to the KMS-encrypted topic.
  assert {
    condition     = aws_sns_topic.alarms.kms_master_key_id == aws_kms_key.this.arn
    error_message = "the alarm topic is KMS-encrypted"
  }
  assert {
    condition     = toset(keys(aws_cloudwatch_metric_alarm.alb)) == toset(["unhealthy-hosts", "elb-5xx", "target-5xx"]) && aws_cloudwatch_metric_alarm.alb["unhealthy-hosts"].metric_name == "UnHealthyHostCount"
    error_message = "load balancer alarms: unhealthy hosts, ELB 5xx, target 5xx"
  }
  assert {
    condition     = length(aws_cloudwatch_metric_alarm.redis) == 8 && aws_cloudwatch_metric_alarm.redis["beach-road-002-evictions"].dimensions["CacheClusterId"] == "beach-road-002"
    error_message = "four Redis alarms per node (CPU, memory, evictions, connections)"
  }
  assert {
    condition = alltrue([for a in concat(values(aws_cloudwatch_metric_alarm.alb), values(aws_cloudwatch_metric_alarm.redis), [aws_cloudwatch_metric_alarm.response_time, aws_cloudwatch_metric_alarm.server_errors]) :
    a.alarm_actions == toset([aws_sns_topic.alarms.arn])])
    error_message = "every alarm notifies the topic"
  }

  # Logs: the journal to a KMS-encrypted log group with retention; ALB access logs to S3.
  assert {
    condition     = aws_cloudwatch_log_group.instances.retention_in_days == 30 && aws_cloudwatch_log_group.instances.kms_key_id == aws_kms_key.this.arn
    error_message = "the instances' log group has a retention and the stack's key"
  }
  assert {
    condition     = strcontains(local.user_data, "\"log_group_name\": \"/beach-road/beach-road\"") && strcontains(local.user_data, "_SYSTEMD_UNIT=beach-road.service --output=cat")
    error_message = "the CloudWatch agent ships the server's journal lines to the log group"
  }
  assert {
    condition = (aws_lb.this.access_logs[0].enabled == true && aws_lb.this.access_logs[0].bucket == aws_s3_bucket.alb_logs.id
      && aws_s3_bucket_versioning.alb_logs.versioning_configuration[0].status == "Enabled"
      && aws_s3_bucket_public_access_block.alb_logs.restrict_public_buckets == true
    && aws_s3_bucket_lifecycle_configuration.alb_logs.rule[0].expiration[0].days == 90)
    error_message = "ALB access logs go to a versioned, private bucket with a lifecycle"
  }
  assert {
    condition     = aws_wafv2_web_acl_association.alb.resource_arn == aws_lb.this.arn
    error_message = "the WAF protects the ALB"
  }
}

# Redis Cluster: shards of a primary and replicas, a cluster-enabled parameter group of the same
# family, and REDIS_URL=rediss+cluster://:<token>@<configuration endpoint>:6379 composed at boot
# exactly like the single-node URL (same secret, same TLS and AUTH).
run "redis_cluster_mode" {
  command = apply

  variables {
    redis_cluster_mode       = true
    redis_shards             = 4
    redis_replicas_per_shard = 2
  }

  # The mock's primary endpoint stays set, so that using it instead would show.
  override_resource {
    target = aws_elasticache_replication_group.redis
    values = { configuration_endpoint_address = "clustercfg.beach-road.abc123.use1.cache.amazonaws.com" }
  }
  override_resource {
    target = aws_secretsmanager_secret.redis_auth[0]
    values = { arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:beach-road-redis-auth-GhIjKl" }
  }

  assert {
    condition = (aws_elasticache_replication_group.redis.num_node_groups == 4
      && aws_elasticache_replication_group.redis.replicas_per_node_group == 2
    && aws_elasticache_replication_group.redis.cluster_mode == "enabled")
    error_message = "cluster mode: redis_shards node groups, redis_replicas_per_shard replicas each"
  }
  assert {
    condition     = aws_elasticache_replication_group.redis.automatic_failover_enabled && aws_elasticache_replication_group.redis.multi_az_enabled
    error_message = "cluster mode keeps automatic failover and multi-AZ"
  }
  assert {
    condition = (aws_elasticache_parameter_group.redis.family == "redis7" && aws_elasticache_parameter_group.redis.name == "beach-road-redis7-cluster"
      && anytrue([for p in aws_elasticache_parameter_group.redis.parameter : p.name == "cluster-enabled" && p.value == "yes"])
      && anytrue([for p in aws_elasticache_parameter_group.redis.parameter : p.name == "maxmemory-policy" && p.value == "noeviction"])
    && aws_elasticache_replication_group.redis.parameter_group_name == aws_elasticache_parameter_group.redis.name)
    error_message = "cluster mode: the same family with cluster-enabled yes, still noeviction"
  }
  assert {
    condition = (aws_elasticache_replication_group.redis.engine_version == "7.1"
      && aws_elasticache_replication_group.redis.transit_encryption_enabled == true && aws_elasticache_replication_group.redis.transit_encryption_mode == "required"
    && aws_elasticache_replication_group.redis.auth_token == random_password.redis_auth[0].result)
    error_message = "cluster mode: Redis 7 (sharded pub/sub), TLS required and AUTH with the generated token"
  }
  assert {
    condition     = strcontains(local.user_data, "\"$fetch\" redis-env 'us-east-1' 'amazonaws.com' 'arn:aws:secretsmanager:us-east-1:123456789012:secret:beach-road-redis-auth-GhIjKl' 'rediss+cluster://clustercfg.beach-road.abc123.use1.cache.amazonaws.com' '6379' /etc/beach-road/redis.env\n")
    error_message = "user data composes REDIS_URL with the rediss+cluster:// scheme and the configuration endpoint"
  }
  assert {
    condition     = !strcontains(local.user_data, "master.beach-road")
    error_message = "cluster mode: not the primary endpoint"
  }
  assert {
    condition     = !can(regex("(?m)^REDIS_URL=", local.user_data)) && !strcontains(local.user_data, nonsensitive(random_password.redis_auth[0].result))
    error_message = "neither REDIS_URL nor the token is in the user data"
  }
  assert {
    condition     = output.redis_endpoint == "clustercfg.beach-road.abc123.use1.cache.amazonaws.com" && output.redis_primary_endpoint == null
    error_message = "the endpoint output is the configuration endpoint in cluster mode"
  }
  assert {
    condition     = terraform_data.redis_mode.output == "cluster"
    error_message = "the mode is tracked, so that changing it replaces the replication group"
  }
  assert {
    condition     = length(aws_cloudwatch_metric_alarm.redis) == 48 && aws_cloudwatch_metric_alarm.redis["beach-road-0004-003-evictions"].dimensions["CacheClusterId"] == "beach-road-0004-003"
    error_message = "four Redis alarms per node of every shard (<name>-<shard>-<node>)"
  }
}

run "rejects_cluster_without_replicas" {
  command = plan

  variables {
    redis_cluster_mode       = true
    redis_replicas_per_shard = 0
  }

  expect_failures = [var.redis_replicas_per_shard]
}

run "rejects_too_many_shards" {
  command = plan

  variables {
    redis_cluster_mode = true
    redis_shards       = 501
  }

  expect_failures = [var.redis_shards]
}

run "https_binary_custom_drain" {
  command = apply

  variables {
    binary_url          = "https://artifacts.example.com/beach-road"
    binary_sha256       = ""
    drain_delay_seconds = 45
    extra_env = { BEACH_ROAD_MAX_CONNECTIONS = "30000", REDIS_URL = "redis://ignored",
    BEACH_ROAD_TRUSTED_PROXIES = "0.0.0.0/0" }
    server_secret_version    = 2
    extra_https_egress_cidrs = ["203.0.113.0/24"]
  }

  assert {
    condition     = strcontains(local.user_data, "curl -fsSL --retry 5 --retry-connrefused -o \"$tmp/beach-road\" 'https://artifacts.example.com/beach-road'")
    error_message = "https:// binaries are fetched with curl"
  }
  assert {
    condition     = aws_vpc_security_group_egress_rule.instance_extra_https["203.0.113.0/24"].cidr_ipv4 == "203.0.113.0/24"
    error_message = "an https:// binary outside AWS gets its own egress rule"
  }
  assert {
    condition     = !strcontains(local.user_data, "sha256sum")
    error_message = "no checksum line without binary_sha256"
  }
  assert {
    condition     = length(aws_iam_role_policy.binary) == 0
    error_message = "no S3 policy for https:// binaries"
  }
  assert {
    condition     = strcontains(local.user_data, "BEACH_ROAD_MAX_CONNECTIONS=30000\n") && !strcontains(local.user_data, "redis://ignored") && !strcontains(local.user_data, "0.0.0.0/0")
    error_message = "extra_env is added but cannot override the wired settings"
  }
  assert {
    condition     = aws_secretsmanager_secret_version.server_secret.secret_string_wo_version == 2 && strcontains(local.user_data, "# - the server secret (generation 2)")
    error_message = "server_secret_version rotates the secret and changes the user data"
  }
  assert {
    condition     = aws_lb_target_group.road.deregistration_delay == "45" && strcontains(local.user_data, "TimeoutStopSec=80s")
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
    extra_env = { BEACH_ROAD_SECRET = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" }
  }

  expect_failures = [var.extra_env]
}

run "existing_redis_auth_secret" {
  command = apply

  variables {
    redis_auth_token_secret_arn  = "arn:aws:secretsmanager:us-east-1:123456789012:secret:shared-redis-auth-MnOpQr"
    redis_auth_token_kms_key_arn = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000003"
  }

  override_data {
    target = data.aws_secretsmanager_secret_version.redis_auth[0]
    values = { secret_string = "existing-token-aaaaaaaaaaaaaaaaaaaa" }
  }

  assert {
    condition     = length(random_password.redis_auth) == 0 && length(aws_secretsmanager_secret.redis_auth) == 0 && length(aws_secretsmanager_secret_version.redis_auth) == 0
    error_message = "an existing secret: nothing generated, no secret of our own"
  }
  assert {
    condition     = aws_elasticache_replication_group.redis.auth_token == "existing-token-aaaaaaaaaaaaaaaaaaaa"
    error_message = "Redis gets the token of the existing secret"
  }
  assert {
    condition     = strcontains(local.user_data, "'arn:aws:secretsmanager:us-east-1:123456789012:secret:shared-redis-auth-MnOpQr' 'master.beach-road.abc123.use1.cache.amazonaws.com'") && !strcontains(local.user_data, "existing-token-aaaaaaaaaaaaaaaaaaaa")
    error_message = "instances read the existing secret at boot; the token is not in the user data"
  }
  assert {
    condition = (contains(data.aws_iam_policy_document.secrets.statement[0].resources, "arn:aws:secretsmanager:us-east-1:123456789012:secret:shared-redis-auth-MnOpQr")
    && contains(data.aws_iam_policy_document.secrets.statement[1].resources, "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000003"))
    error_message = "the instance role may read the existing secret and decrypt it through Secrets Manager"
  }
}

run "redis_auth_token_from_variable" {
  command = apply

  variables {
    redis_auth_token = "operator-token-bbbbbbbbbbbbbbbbbb"
  }

  assert {
    condition     = length(random_password.redis_auth) == 0 && aws_secretsmanager_secret_version.redis_auth[0].secret_string == "operator-token-bbbbbbbbbbbbbbbbbb" && aws_elasticache_replication_group.redis.auth_token == "operator-token-bbbbbbbbbbbbbbbbbb"
    error_message = "a given token goes to Redis and to the stack's secret"
  }
  assert {
    condition     = !strcontains(local.user_data, "operator-token-bbbbbbbbbbbbbbbbbb")
    error_message = "the token is not in the user data"
  }
}

run "existing_vpc_endpoints_no_ssm" {
  command = apply

  variables {
    create_vpc_endpoints  = false
    install_ssm_agent     = false
    asg_health_check_type = "EC2"
  }

  override_data {
    target = data.aws_vpc.this[0]
    values = { cidr_block = "10.20.0.0/16" }
  }

  assert {
    condition     = length(aws_vpc_endpoint.interface) == 0 && length(aws_vpc_endpoint.s3) == 0 && length(aws_security_group.endpoints) == 0
    error_message = "no endpoints are created when the VPC has them"
  }
  assert {
    condition     = aws_vpc_security_group_egress_rule.instance_to_endpoints.cidr_ipv4 == "10.20.0.0/16"
    error_message = "then HTTPS goes to the VPC's CIDR, where the existing endpoints are"
  }
  assert {
    condition     = !strcontains(local.user_data, "amazon-ssm-agent.deb")
    error_message = "no SSM agent without install_ssm_agent"
  }
  assert {
    condition     = aws_autoscaling_group.road.health_check_type == "EC2"
    error_message = "the health check type can be set back to EC2"
  }
}

run "rejects_bad_redis_auth_token" {
  command = plan

  variables {
    redis_auth_token = "slash/cccccccccccccccccccc"
  }

  expect_failures = [var.redis_auth_token]
}

run "rejects_checkpoints_not_ending_at_100" {
  command = plan

  variables {
    refresh_checkpoint_percentages = [100, 50]
  }

  expect_failures = [var.refresh_checkpoint_percentages]
}
