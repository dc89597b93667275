# beach-road on AWS: ALB (HTTPS, WebSockets) -> Auto Scaling group of stateless instances ->
# ElastiCache Redis (TLS, multi-AZ). The VPC and its subnets already exist (variables).

data "aws_partition" "current" {}

# Official Debian 12 images (owner: Debian). A binary built on Debian 12 needs its glibc (2.36);
# older distributions (e.g. Amazon Linux 2023, glibc 2.34) may refuse to run it.
data "aws_ami" "debian12" {
  count       = var.ami_id == "" ? 1 : 0
  most_recent = true
  owners      = ["136693071363"]

  filter {
    name   = "name"
    values = ["debian-12-amd64-*"]
  }

  filter {
    name   = "architecture"
    values = ["x86_64"]
  }
}

locals {
  ami_id = var.ami_id != "" ? var.ami_id : data.aws_ami.debian12[0].id

  binary_from_s3 = startswith(var.binary_url, "s3://")
  # s3://bucket/key -> [bucket, key]
  binary_s3 = local.binary_from_s3 ? regex("^s3://([^/]+)/(.+)$", var.binary_url) : []

  redis_port = 6379
  # REDIS_URL is rediss://:<AUTH token>@<this>:6379 (TLS: the replication group has encryption in
  # transit on), or in cluster mode rediss+cluster://:<AUTH token>@<this>:6379 with the
  # configuration endpoint as the one seed node (the client learns the other nodes and the slot
  # map from it). It holds the token, so it is not in the env file below: each instance composes
  # it at boot into the root-only /etc/beach-road/redis.env (see the user data).
  redis_host = (var.redis_cluster_mode ? aws_elasticache_replication_group.redis.configuration_endpoint_address
  : aws_elasticache_replication_group.redis.primary_endpoint_address)
  # The boot helper's HOST argument: the endpoint, and in cluster mode the URL scheme before it
  # (the helper accepts rediss:// (the default) and rediss+cluster:// there, nothing without TLS).
  # The scheme rides in the template's redis_host rather than in a variable of its own so that the
  # template keeps the variables scripts/check-terraform renders it with.
  redis_fetch_host = var.redis_cluster_mode ? "rediss+cluster://${local.redis_host}" : local.redis_host

  # The ALB's nodes live in its subnets: their X-Forwarded-For is the only one to believe (the
  # ALB appends the address it saw, the server takes the right-most hop it does not trust).
  trusted_proxies = join(",", [for id in var.public_subnet_ids : data.aws_subnet.alb[id].cidr_block])

  # /etc/beach-road/env. The settings this file depends on win over var.extra_env, and REDIS_URL
  # never comes from it (redis.env sets it). No secret in it: user data is readable by anyone
  # allowed to describe the instances (both secrets come from Secrets Manager, see secrets.tf).
  # JSON log lines: the journal ships them to CloudWatch Logs as they are (Logs Insights parses
  # them); a build without --log-format ignores the variable.
  env = merge({ for k, v in var.extra_env : k => v if k != "REDIS_URL" }, {
    BEACH_ROAD_BIND            = "0.0.0.0"
    BEACH_ROAD_PORT            = tostring(var.instance_port)
    BEACH_ROAD_LOG_FORMAT      = "json"
    BEACH_SESSION_SERVER       = "https://${var.domain_name}"
    BEACH_ROAD_TRUSTED_PROXIES = local.trusted_proxies
    BEACH_ROAD_DRAIN_DELAY     = "${var.drain_delay_seconds}s"
    BEACH_ROAD_DRAIN_JITTER    = "${var.drain_jitter_seconds}s"
  })
  env_file = join("", [for k, v in local.env : "${k}=${v}\n"])

  # systemd must wait for the whole drain before it sends SIGKILL: delay + jitter + margin.
  timeout_stop_sec = var.drain_delay_seconds + var.drain_jitter_seconds + 30

  user_data = templatefile("${path.module}/templates/user_data.sh.tftpl", {
    binary_url            = var.binary_url
    binary_sha256         = var.binary_sha256
    binary_from_s3        = local.binary_from_s3
    binary_s3_bucket      = local.binary_from_s3 ? local.binary_s3[0] : ""
    binary_s3_key         = local.binary_from_s3 ? local.binary_s3[1] : ""
    env_file              = local.env_file
    unit                  = file("${path.module}/../deploy/beach-road.service")
    secret_dropin         = file("${path.module}/../deploy/beach-road-secret.conf")
    aws_fetch             = file("${path.module}/templates/aws_fetch.py")
    timeout_stop_sec      = local.timeout_stop_sec
    region                = var.region
    dns_suffix            = local.dns_suffix
    server_secret_arn     = aws_secretsmanager_secret.server_secret.arn
    server_secret_version = var.server_secret_version
    redis_auth_secret_arn = local.redis_auth_secret_arn
    redis_host            = local.redis_fetch_host
    redis_port            = local.redis_port
    log_group             = aws_cloudwatch_log_group.instances.name
    install_ssm_agent     = var.install_ssm_agent
  })
}

data "aws_subnet" "alb" {
  for_each = toset(var.public_subnet_ids)
  id       = each.value
}

# --- Security groups -----------------------------------------------------------------------------

resource "aws_security_group" "alb" {
  name        = "${var.name}-alb"
  description = "beach-road load balancer"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "alb_in" {
  for_each = { for pair in setproduct(var.allowed_cidrs, [80, 443]) : "${pair[0]}-${pair[1]}" => pair }

  security_group_id = aws_security_group.alb.id
  description       = "clients (80 only redirects to 443)"
  cidr_ipv4         = each.value[0]
  ip_protocol       = "tcp"
  from_port         = each.value[1]
  to_port           = each.value[1]
}

resource "aws_vpc_security_group_egress_rule" "alb_to_instances" {
  security_group_id            = aws_security_group.alb.id
  description                  = "to beach-road instances (traffic and health checks)"
  referenced_security_group_id = aws_security_group.instance.id
  ip_protocol                  = "tcp"
  from_port                    = var.instance_port
  to_port                      = var.instance_port
}

resource "aws_security_group" "instance" {
  name        = "${var.name}-instance"
  description = "beach-road instances"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "instance_from_alb" {
  security_group_id            = aws_security_group.instance.id
  description                  = "from the load balancer only"
  referenced_security_group_id = aws_security_group.alb.id
  ip_protocol                  = "tcp"
  from_port                    = var.instance_port
  to_port                      = var.instance_port
}

# Prometheus scrapes each instance directly (GET /metrics on the instance port) from these
# networks; none by default.
resource "aws_vpc_security_group_ingress_rule" "instance_from_scrapers" {
  for_each          = toset(var.metrics_scraper_cidrs)
  security_group_id = aws_security_group.instance.id
  description       = "Prometheus scrapes /metrics"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = var.instance_port
  to_port           = var.instance_port
}

resource "aws_vpc_security_group_egress_rule" "instance_to_redis" {
  security_group_id            = aws_security_group.instance.id
  description                  = "to Redis"
  referenced_security_group_id = aws_security_group.redis.id
  ip_protocol                  = "tcp"
  from_port                    = local.redis_port
  to_port                      = local.redis_port
}

# The instances' other egress (HTTPS to the VPC endpoints only) is in endpoints.tf.

# Redis accepts connections from the instances on 6379 and nothing else; no egress rules (Terraform
# removes the default allow-all egress rule of a security group it creates).
resource "aws_security_group" "redis" {
  name        = "${var.name}-redis"
  description = "beach-road Redis"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "redis_from_instances" {
  security_group_id            = aws_security_group.redis.id
  description                  = "from beach-road instances only"
  referenced_security_group_id = aws_security_group.instance.id
  ip_protocol                  = "tcp"
  from_port                    = local.redis_port
  to_port                      = local.redis_port
}

# --- Redis ---------------------------------------------------------------------------------------

# beach-road requires noeviction: a full Redis then refuses new writes with an OOM error (new
# sessions and joins get 503; the instances' heartbeat scripts are allowed to run at the limit, so
# no instance is fenced) instead of evicting other users' live sessions, rooms and mailboxes.
# ElastiCache's default.redis7 group evicts (volatile-lru).
# Cluster mode: the same family with cluster-enabled yes (what default.redis7.cluster.on has), under
# another name, so that switching modes replaces the group instead of changing a static parameter
# of one in use (the replication group is replaced with it, see terraform_data.redis_mode).
resource "aws_elasticache_parameter_group" "redis" {
  name        = var.redis_cluster_mode ? "${var.name}-redis7-cluster" : "${var.name}-redis7"
  family      = "redis7"
  description = "beach-road: refuse writes when full, never evict"

  parameter {
    name  = "maxmemory-policy"
    value = "noeviction"
  }

  dynamic "parameter" {
    for_each = var.redis_cluster_mode ? ["yes"] : []
    content {
      name  = "cluster-enabled"
      value = parameter.value
    }
  }
}

resource "aws_elasticache_subnet_group" "redis" {
  name       = "${var.name}-redis"
  subnet_ids = var.private_subnet_ids
}

# ElastiCache cannot turn cluster mode on or off in place the way Terraform would try (a new
# parameter group, resharding a group without shards): a change of mode replaces the replication
# group instead, and with it every live session, room and mailbox (README). Created on the first
# apply of a deployment that predates it, which replaces nothing.
resource "terraform_data" "redis_mode" {
  input = var.redis_cluster_mode ? "cluster" : "single"
}

# Single-node mode (default; cluster mode disabled): one primary and replicas in other AZs. The
# primary endpoint is a DNS name that follows the primary through an automatic failover;
# beach-road reconnects and /ready is 503 while Redis is away (see the ASG below for what the
# health check does with that).
# Cluster mode (redis_cluster_mode): redis_shards shards, each a primary with
# redis_replicas_per_shard replicas in other AZs, failing over on its own; the instances connect
# through the configuration endpoint and follow the slot map (MOVED, ASK) themselves. Sessions are
# spread over the shards by hash slot, cross-instance messages go by sharded pub/sub (Redis 7).
resource "aws_elasticache_replication_group" "redis" {
  replication_group_id = var.name
  description          = "beach-road shared state (sessions, rooms, mailbox, instance liveness)"
  engine               = "redis"
  engine_version       = var.redis_engine_version
  node_type            = var.redis_node_type
  port                 = local.redis_port
  parameter_group_name = aws_elasticache_parameter_group.redis.name
  num_cache_clusters   = var.redis_cluster_mode ? null : var.redis_num_nodes

  cluster_mode            = var.redis_cluster_mode ? "enabled" : null
  num_node_groups         = var.redis_cluster_mode ? var.redis_shards : null
  replicas_per_node_group = var.redis_cluster_mode ? var.redis_replicas_per_shard : null

  automatic_failover_enabled = true
  multi_az_enabled           = true

  # TLS required and AUTH on: the token comes from secrets.tf (it is in the state, see there).
  # ROTATE (default): a changed token is added next to the old one (or, on a group without AUTH,
  # unauthenticated clients stay allowed), so instances still on the old settings keep working
  # until the instance refresh has replaced them; SET afterwards drops the old one (README).
  transit_encryption_enabled = true
  transit_encryption_mode    = "required"
  auth_token                 = local.redis_auth_token
  auth_token_update_strategy = var.redis_auth_token_update_strategy
  # At once (default): the token must be in effect before the refreshed instances use it, and
  # Terraform waits for an immediate modification before it updates the launch template.
  apply_immediately          = var.redis_apply_immediately
  at_rest_encryption_enabled = true
  # Changing the key of an existing group replaces it (all live sessions lost): see redis_at_rest_cmk.
  kms_key_id = var.redis_at_rest_cmk ? aws_kms_key.this.arn : null

  subnet_group_name  = aws_elasticache_subnet_group.redis.name
  security_group_ids = [aws_security_group.redis.id]

  auto_minor_version_upgrade = true
  # Everything in it expires within hours (session TTL 12h); no backups.
  snapshot_retention_limit = 0

  lifecycle {
    replace_triggered_by = [terraform_data.redis_mode]
  }
}

# --- Load balancer -------------------------------------------------------------------------------

resource "aws_lb" "this" {
  name               = var.name
  load_balancer_type = "application"
  internal           = false
  security_groups    = [aws_security_group.alb.id]
  subnets            = var.public_subnet_ids

  # The ALB idle timeout (default 60 s) also applies to WebSockets, which live for hours. The
  # server pings every 20 s so a healthy socket is never idle that long anyway; 3600 s (the limit
  # is 4000) makes sure the ALB is never the component that decides a socket is dead. beach-road's
  # own idle timeout (60 s without a pong) does that, and tells the room with peer_left.
  idle_timeout = 3600

  drop_invalid_header_fields = true

  # On by default (var.alb_deletion_protection): `terraform destroy` then needs it turned off first.
  enable_deletion_protection = var.alb_deletion_protection

  access_logs {
    bucket  = aws_s3_bucket.alb_logs.id
    prefix  = local.alb_log_prefix
    enabled = true
  }

  # The ALB checks at creation that it may write to the bucket.
  depends_on = [aws_s3_bucket_policy.alb_logs]
}

resource "aws_lb_target_group" "road" {
  name        = var.name
  port        = var.instance_port
  protocol    = "HTTP"
  vpc_id      = var.vpc_id
  target_type = "instance"

  # Equal to BEACH_ROAD_DRAIN_DELAY: both are "how long a leaving instance keeps its connections
  # while the fleet stops sending it new ones". On SIGTERM (a restart, an instance refresh) the
  # instance fails /ready and keeps serving for the drain delay; on deregistration (scale-in) the
  # ALB sends no new requests and keeps existing connections for this long. Using one number keeps
  # the two paths identical and lets systemd's TimeoutStopSec be derived from it.
  deregistration_delay = var.drain_delay_seconds

  # No stickiness: instances are stateless, a client may reach any of them.
  stickiness {
    type    = "lb_cookie"
    enabled = false
  }

  # /ready, not /health: /ready is 503 while the instance cannot use Redis or is draining, so the
  # ALB stops routing to it; /health only says the process is alive, which is systemd's concern
  # (WatchdogSec restarts a stuck runtime). 2 x 5 s: a draining instance is out within ~12 s.
  health_check {
    path                = "/ready"
    protocol            = "HTTP"
    port                = "traffic-port"
    matcher             = "200"
    interval            = 5
    timeout             = 2
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }
}

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.this.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = var.ssl_policy
  certificate_arn   = var.certificate_arn

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.road.arn
  }
}

# GET /metrics (Prometheus, beach_road_* series) is for scrapers inside the VPC, and the Admin
# API (/admin/..., bearer token) for operators on an instance (SSM port forwarding), not for the
# internet: the public listener answers 404 for both and never forwards them to an instance.
# (The server refuses /metrics relayed by a trusted proxy anyway; this keeps it off the ALB.)
resource "aws_lb_listener_rule" "no_public_metrics" {
  listener_arn = aws_lb_listener.https.arn
  priority     = 1

  condition {
    path_pattern {
      values = ["/metrics", "/metrics/*", "/admin", "/admin/*"]
    }
  }

  action {
    type = "fixed-response"

    fixed_response {
      content_type = "text/plain"
      message_body = "not found"
      status_code  = "404"
    }
  }
}

resource "aws_lb_listener" "http_redirect" {
  load_balancer_arn = aws_lb.this.arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type = "redirect"

    redirect {
      protocol    = "HTTPS"
      port        = "443"
      status_code = "HTTP_301"
    }
  }
}

# --- Instances -----------------------------------------------------------------------------------

data "aws_iam_policy_document" "assume_ec2" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "instance" {
  name               = "${var.name}-instance"
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
}

# Shell access through SSM Session Manager instead of SSH (no inbound port, no key pair).
resource "aws_iam_role_policy_attachment" "ssm" {
  role       = aws_iam_role.instance.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

data "aws_iam_policy_document" "binary" {
  count = local.binary_from_s3 ? 1 : 0

  statement {
    actions   = ["s3:GetObject"]
    resources = ["arn:${data.aws_partition.current.partition}:s3:::${local.binary_s3[0]}/${local.binary_s3[1]}"]
  }
}

resource "aws_iam_role_policy" "binary" {
  count = local.binary_from_s3 ? 1 : 0

  name   = "read-beach-road-binary"
  role   = aws_iam_role.instance.id
  policy = data.aws_iam_policy_document.binary[0].json
}

# The CloudWatch agent writes the instances' journal into their log group (observability.tf).
data "aws_iam_policy_document" "logs" {
  statement {
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]
    resources = [aws_cloudwatch_log_group.instances.arn, "${aws_cloudwatch_log_group.instances.arn}:*"]
  }
}

resource "aws_iam_role_policy" "logs" {
  name   = "write-beach-road-logs"
  role   = aws_iam_role.instance.id
  policy = data.aws_iam_policy_document.logs.json
}

resource "aws_iam_instance_profile" "instance" {
  name = "${var.name}-instance"
  role = aws_iam_role.instance.name
}

resource "aws_launch_template" "road" {
  name_prefix   = "${var.name}-"
  image_id      = local.ami_id
  instance_type = var.instance_type
  # gzip: cloud-init unpacks it, and the script (with the unit, the drop-ins and the boot helper)
  # is larger than EC2's 16 KB limit on user data as given; compressed it is about 7.5 KB.
  user_data = base64gzip(local.user_data)

  vpc_security_group_ids = [aws_security_group.instance.id]

  iam_instance_profile {
    arn = aws_iam_instance_profile.instance.arn
  }

  metadata_options {
    http_tokens                 = "required" # IMDSv2 only
    http_endpoint               = "enabled"
    http_put_response_hop_limit = 1
  }

  tag_specifications {
    resource_type = "instance"
    tags          = { Name = var.name }
  }

  update_default_version = true

  lifecycle {
    precondition {
      # 16384 bytes once base64 is undone.
      condition     = length(base64gzip(local.user_data)) * 3 / 4 <= 16384
      error_message = "The compressed user data exceeds EC2's 16 KB limit."
    }
  }
}

resource "aws_autoscaling_group" "road" {
  name                = var.name
  min_size            = var.asg_min_size
  max_size            = var.asg_max_size
  desired_capacity    = var.asg_desired_capacity
  vpc_zone_identifier = var.private_subnet_ids
  target_group_arns   = [aws_lb_target_group.road.arn]

  # ELB: an instance the target group finds not ready (/ready) for 2 checks after the grace period
  # is replaced, so one that never becomes ready (bad binary, wrong token, no route to Redis) does
  # not linger. The cost: /ready also fails on every instance at once while Redis fails over or is
  # away, so an outage longer than ~12 s marks the whole fleet unhealthy. The maintenance policy
  # below makes that harmless for capacity: replacements are launched first and the old instances
  # are terminated (deregistered, drained) only once the new ones are ready, i.e. after Redis is
  # back; the clients then reconnect once, spread by the drain. asg_health_check_type = "EC2"
  # restores the old behaviour (no replacement for readiness; systemd's watchdog restarts a
  # stuck process either way). See README "What heals".
  health_check_type         = var.asg_health_check_type
  health_check_grace_period = var.asg_health_check_grace_period
  default_instance_warmup   = 60

  # Launch before terminate, for health replacements and scaling-related replacements alike:
  # capacity never drops below desired while instances are replaced.
  instance_maintenance_policy {
    min_healthy_percentage = 100
    max_healthy_percentage = 200
  }

  launch_template {
    id      = aws_launch_template.road.id
    version = aws_launch_template.road.latest_version
  }

  # Instances read both secrets at boot and ship logs: those, their permissions and the VPC
  # endpoints they go through must exist first.
  depends_on = [
    aws_secretsmanager_secret_version.server_secret,
    aws_secretsmanager_secret_version.redis_auth,
    aws_iam_role_policy.secrets,
    aws_iam_role_policy.logs,
    aws_vpc_endpoint.interface,
    aws_vpc_endpoint.s3,
  ]

  # A new launch template (binary_url, unit, server_secret_version, ...) starts a refresh: new
  # instances are launched before old ones go (100-200 %), a batch becomes "done" only once the
  # target group finds it ready, and at each checkpoint the refresh waits checkpoint_delay while
  # the alarms watch it. Any of those alarms in ALARM rolls the group back to the previous launch
  # template version (a refresh does not start while one of them is already in ALARM).
  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 100
      max_healthy_percentage = 200
      instance_warmup        = 60
      checkpoint_percentages = var.refresh_checkpoint_percentages
      checkpoint_delay       = var.refresh_checkpoint_delay_seconds
      auto_rollback          = true

      alarm_specification {
        alarms = [for a in local.refresh_alarms : a.alarm_name]
      }
    }
  }

  enabled_metrics = [
    "GroupDesiredCapacity", "GroupInServiceInstances", "GroupPendingInstances",
    "GroupTerminatingInstances", "GroupTotalInstances",
  ]

  # The scaling policy (scaling.tf) moves desired_capacity; an apply must not undo that.
  lifecycle {
    ignore_changes = [desired_capacity]
  }

  tag {
    key                 = "Name"
    value               = var.name
    propagate_at_launch = true
  }
}
