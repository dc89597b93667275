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
  # rediss:// = TLS, required because the replication group has encryption in transit on.
  redis_url = "rediss://${aws_elasticache_replication_group.redis.primary_endpoint_address}:${local.redis_port}"

  # The ALB's nodes live in its subnets: their X-Forwarded-For is the only one to believe (the
  # ALB appends the address it saw, the server takes the right-most hop it does not trust).
  trusted_proxies = join(",", [for id in var.public_subnet_ids : data.aws_subnet.alb[id].cidr_block])

  # /etc/beach-road/env. The settings this file depends on win over var.extra_env. No secret in
  # it: user data is readable by anyone allowed to describe the instances (the server secret
  # comes from Secrets Manager, see below).
  env = merge(var.extra_env, {
    BEACH_ROAD_BIND            = "0.0.0.0"
    BEACH_ROAD_PORT            = tostring(var.instance_port)
    REDIS_URL                  = local.redis_url
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
    env_file              = local.env_file
    unit                  = file("${path.module}/../deploy/beach-road.service")
    secret_dropin         = file("${path.module}/../deploy/beach-road-secret.conf")
    timeout_stop_sec      = local.timeout_stop_sec
    region                = var.region
    server_secret_arn     = aws_secretsmanager_secret.server_secret.arn
    server_secret_version = var.server_secret_version
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

resource "aws_vpc_security_group_egress_rule" "instance_to_redis" {
  security_group_id            = aws_security_group.instance.id
  description                  = "to Redis"
  referenced_security_group_id = aws_security_group.redis.id
  ip_protocol                  = "tcp"
  from_port                    = local.redis_port
  to_port                      = local.redis_port
}

# Outbound web access for the boot script: the binary (S3 or HTTPS), Debian packages (awscli for
# s3:// URLs; Debian mirrors may be plain HTTP) and the SSM agent. DNS, NTP and instance metadata
# use link-local or VPC resolver addresses that security groups do not filter.
resource "aws_vpc_security_group_egress_rule" "instance_web" {
  for_each = toset(["80", "443"])

  security_group_id = aws_security_group.instance.id
  description       = "boot-time downloads and SSM"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = tonumber(each.value)
  to_port           = tonumber(each.value)
}

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
resource "aws_elasticache_parameter_group" "redis" {
  name        = "${var.name}-redis7"
  family      = "redis7"
  description = "beach-road: refuse writes when full, never evict"

  parameter {
    name  = "maxmemory-policy"
    value = "noeviction"
  }
}

resource "aws_elasticache_subnet_group" "redis" {
  name       = "${var.name}-redis"
  subnet_ids = var.private_subnet_ids
}

# Cluster mode disabled: one primary and replicas in other AZs. The primary endpoint is a DNS name
# that follows the primary through an automatic failover; beach-road reconnects and /ready is 503
# while Redis is away (the ALB does not replace instances for that, see the ASG below).
resource "aws_elasticache_replication_group" "redis" {
  replication_group_id = var.name
  description          = "beach-road shared state (sessions, rooms, mailbox, instance liveness)"
  engine               = "redis"
  engine_version       = var.redis_engine_version
  node_type            = var.redis_node_type
  port                 = local.redis_port
  parameter_group_name = aws_elasticache_parameter_group.redis.name
  num_cache_clusters   = var.redis_num_nodes

  automatic_failover_enabled = true
  multi_az_enabled           = true

  transit_encryption_enabled = true
  at_rest_encryption_enabled = true

  subnet_group_name  = aws_elasticache_subnet_group.redis.name
  security_group_ids = [aws_security_group.redis.id]

  auto_minor_version_upgrade = true
  # Everything in it expires within hours (session TTL 12h); no backups.
  snapshot_retention_limit = 0
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

# --- Server secret -------------------------------------------------------------------------------

# The HMAC-SHA-256 key of join codes, one for all instances, never stored in Redis, written to
# Secrets Manager through a write-only argument, so that it is in no plan and no state: two
# random UUIDs without their hyphens, 64 hex digits (uuid() formats 16 bytes from crypto/rand; it
# changes on every run, but a write-only value is written only when server_secret_version
# changes). Each instance reads it at boot into a root-only file that systemd hands to the
# service (deploy/beach-road-secret.conf).
resource "aws_secretsmanager_secret" "server_secret" {
  name_prefix = "${var.name}-server-secret-"
  description = "beach-road: HMAC key of join codes, shared by all instances"
}

resource "aws_secretsmanager_secret_version" "server_secret" {
  secret_id                = aws_secretsmanager_secret.server_secret.id
  secret_string_wo         = replace("${uuid()}${uuid()}", "-", "")
  secret_string_wo_version = var.server_secret_version
}

data "aws_iam_policy_document" "server_secret" {
  statement {
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [aws_secretsmanager_secret.server_secret.arn]
  }
}

resource "aws_iam_role_policy" "server_secret" {
  name   = "read-beach-road-server-secret"
  role   = aws_iam_role.instance.id
  policy = data.aws_iam_policy_document.server_secret.json
}

resource "aws_iam_instance_profile" "instance" {
  name = "${var.name}-instance"
  role = aws_iam_role.instance.name
}

resource "aws_launch_template" "road" {
  name_prefix   = "${var.name}-"
  image_id      = local.ami_id
  instance_type = var.instance_type
  user_data     = base64encode(local.user_data)

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
}

resource "aws_autoscaling_group" "road" {
  name                = var.name
  min_size            = var.asg_min_size
  max_size            = var.asg_max_size
  desired_capacity    = var.asg_desired_capacity
  vpc_zone_identifier = var.private_subnet_ids
  target_group_arns   = [aws_lb_target_group.road.arn]

  # EC2, not ELB: the target group checks /ready, which fails on every instance at once while Redis
  # fails over or is unreachable. Replacing instances for that would only churn the fleet and drop
  # every WebSocket. A stuck process is systemd's job (WatchdogSec, Restart=always).
  health_check_type         = "EC2"
  health_check_grace_period = 120

  launch_template {
    id      = aws_launch_template.road.id
    version = aws_launch_template.road.latest_version
  }

  # Instances read the secret at boot: it and their permission to read it must exist first.
  depends_on = [aws_secretsmanager_secret_version.server_secret, aws_iam_role_policy.server_secret]

  # A new launch template (new binary_url, new unit) replaces instances a few at a time.
  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 50
      instance_warmup        = 60
    }
  }

  tag {
    key                 = "Name"
    value               = var.name
    propagate_at_launch = true
  }
}
