# Alarms (to an encrypted SNS topic) and the instances' logs.

# --- Logs ----------------------------------------------------------------------------------------

# The instances' journal, shipped by the CloudWatch agent (see the user data): stream
# <instance id>/beach-road holds the server's own JSON lines, <instance id>/journal the rest of
# the journal (boot, systemd, kernel), so a unit that never starts is visible too.
resource "aws_cloudwatch_log_group" "instances" {
  #checkov:skip=CKV_AWS_338: the server's lines carry client IP addresses (remote_addr), which are personal data: they are kept log_retention_days (default 30), not a year. Raise it if your policy requires.
  name              = local.log_group
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.this.arn
}

# Error lines of the server: tracing's JSON layout puts the level in "level".
resource "aws_cloudwatch_log_metric_filter" "server_errors" {
  name           = "${var.name}-server-errors"
  log_group_name = aws_cloudwatch_log_group.instances.name
  pattern        = "{ $.level = \"ERROR\" }"

  metric_transformation {
    name          = "ServerErrorLines"
    namespace     = "beach-road/${var.name}"
    value         = "1"
    default_value = "0"
  }
}

# --- Alarm topic ---------------------------------------------------------------------------------

resource "aws_sns_topic" "alarms" {
  name              = "${var.name}-alarms"
  kms_master_key_id = aws_kms_key.this.arn
}

data "aws_iam_policy_document" "alarm_topic" {
  statement {
    sid       = "CloudWatchAlarmsOfThisAccountPublish"
    actions   = ["sns:Publish"]
    resources = [aws_sns_topic.alarms.arn]
    principals {
      type        = "Service"
      identifiers = ["cloudwatch.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_sns_topic_policy" "alarms" {
  arn    = aws_sns_topic.alarms.arn
  policy = data.aws_iam_policy_document.alarm_topic.json
}

# E-mail subscriptions must be confirmed from the mail AWS sends.
resource "aws_sns_topic_subscription" "alarm_email" {
  for_each  = toset(var.alarm_emails)
  topic_arn = aws_sns_topic.alarms.arn
  protocol  = "email"
  endpoint  = each.value
}

# --- Alarms --------------------------------------------------------------------------------------

locals {
  alb_dimensions = { LoadBalancer = aws_lb.this.arn_suffix }
  tg_dimensions  = { LoadBalancer = aws_lb.this.arn_suffix, TargetGroup = aws_lb_target_group.road.arn_suffix }

  # Load balancer alarms: 1-minute periods; "m of n" so that one bad minute does not page.
  alb_alarms = {
    # A target failing /ready: not ready (Redis), draining for longer than a restart takes, or a
    # new instance that never became ready. Also gates the instance refresh.
    unhealthy-hosts = {
      metric    = "UnHealthyHostCount", scope = "target-group", statistic = "Maximum"
      threshold = 0, periods = 3, datapoints = 2
      text      = "targets of the target group fail /ready"
    }
    # 5xx produced by the ALB itself: 502/504 from instances that close or time out, 503 with
    # no registered target. Also gates the instance refresh.
    elb-5xx = {
      metric    = "HTTPCode_ELB_5XX_Count", scope = "load-balancer", statistic = "Sum"
      threshold = var.alarm_elb_5xx_per_minute, periods = 5, datapoints = 3
      text      = "the load balancer answers 5xx"
    }
    # 5xx from beach-road (e.g. 503 for new sessions while Redis is away or full). Also gates
    # the instance refresh.
    target-5xx = {
      metric    = "HTTPCode_Target_5XX_Count", scope = "target-group", statistic = "Sum"
      threshold = var.alarm_target_5xx_per_minute, periods = 5, datapoints = 3
      text      = "beach-road answers 5xx"
    }
  }

  refresh_alarms = [for k in ["unhealthy-hosts", "elb-5xx", "target-5xx"] : aws_cloudwatch_metric_alarm.alb[k]]

  # Redis alarms, per node: ElastiCache's names for the nodes of a replication group, <name>-001,
  # -002, ... with cluster mode disabled, <name>-<shard>-<node> (<name>-0001-001, ...) with it.
  redis_nodes = (var.redis_cluster_mode
    ? [for p in setproduct(range(1, var.redis_shards + 1), range(1, var.redis_replicas_per_shard + 2)) : format("%s-%04d-%03d", var.name, p[0], p[1])]
  : [for i in range(var.redis_num_nodes) : format("%s-%03d", var.name, i + 1)])
  redis_metric_alarms = {
    # Redis runs commands on one thread: this is the CPU that limits it.
    engine-cpu = {
      metric = "EngineCPUUtilization", statistic = "Average", threshold = var.alarm_redis_cpu_percent
      text   = "Redis engine CPU is high"
    }
    # noeviction: at 100 % Redis refuses writes and new sessions and joins get 503.
    memory = {
      metric = "DatabaseMemoryUsagePercentage", statistic = "Maximum", threshold = var.alarm_redis_memory_percent
      text   = "Redis memory is filling up (at 100 % new sessions are refused)"
    }
    # With maxmemory-policy noeviction there must be none: an eviction means the parameter
    # group is not in effect and live sessions are being dropped.
    evictions = {
      metric = "Evictions", statistic = "Sum", threshold = 0
      text   = "Redis evicted keys (it must not: noeviction)"
    }
    # Each instance holds a handful of connections; far more means a leak or a foreign client.
    connections = {
      metric = "CurrConnections", statistic = "Maximum", threshold = var.alarm_redis_max_connections
      text   = "Redis has more connections than expected"
    }
  }
  redis_alarms = {
    for pair in setproduct(local.redis_nodes, keys(local.redis_metric_alarms)) :
    "${pair[0]}-${pair[1]}" => merge(local.redis_metric_alarms[pair[1]], { node = pair[0] })
  }
}

resource "aws_cloudwatch_metric_alarm" "alb" {
  for_each = local.alb_alarms

  alarm_name          = "${var.name}-${each.key}"
  alarm_description   = "beach-road ${var.name}: ${each.value.text}"
  namespace           = "AWS/ApplicationELB"
  metric_name         = each.value.metric
  dimensions          = each.value.scope == "target-group" ? local.tg_dimensions : local.alb_dimensions
  statistic           = each.value.statistic
  period              = 60
  evaluation_periods  = each.value.periods
  datapoints_to_alarm = each.value.datapoints
  comparison_operator = "GreaterThanThreshold"
  threshold           = each.value.threshold
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  ok_actions          = [aws_sns_topic.alarms.arn]
}

# p99 of the time from the ALB sending a request to the instance until the response starts:
# HTTP calls (register, join, offers/answers) and the WebSocket upgrade's 101.
resource "aws_cloudwatch_metric_alarm" "response_time" {
  alarm_name          = "${var.name}-target-response-time"
  alarm_description   = "beach-road ${var.name}: p99 response time above ${var.alarm_p99_response_seconds} s"
  namespace           = "AWS/ApplicationELB"
  metric_name         = "TargetResponseTime"
  dimensions          = local.tg_dimensions
  extended_statistic  = "p99"
  period              = 60
  evaluation_periods  = 5
  datapoints_to_alarm = 3
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.alarm_p99_response_seconds
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  ok_actions          = [aws_sns_topic.alarms.arn]
}

resource "aws_cloudwatch_metric_alarm" "redis" {
  for_each = local.redis_alarms

  alarm_name          = "${var.name}-redis-${each.key}"
  alarm_description   = "beach-road ${var.name}: ${each.value.text} (node ${each.value.node})"
  namespace           = "AWS/ElastiCache"
  metric_name         = each.value.metric
  dimensions          = { CacheClusterId = each.value.node }
  statistic           = each.value.statistic
  period              = 60
  evaluation_periods  = 5
  datapoints_to_alarm = 3
  comparison_operator = "GreaterThanThreshold"
  threshold           = each.value.threshold
  # A node that reports nothing is covered by the instances' /ready and UnHealthyHostCount.
  treat_missing_data = "notBreaching"
  alarm_actions      = [aws_sns_topic.alarms.arn]
  ok_actions         = [aws_sns_topic.alarms.arn]
}

resource "aws_cloudwatch_metric_alarm" "server_errors" {
  alarm_name          = "${var.name}-server-error-lines"
  alarm_description   = "beach-road ${var.name}: the servers log ERROR lines (see log group ${local.log_group})"
  namespace           = "beach-road/${var.name}"
  metric_name         = "ServerErrorLines"
  statistic           = "Sum"
  period              = 300
  evaluation_periods  = 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.alarm_server_error_lines_per_5min
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  ok_actions          = [aws_sns_topic.alarms.arn]

  depends_on = [aws_cloudwatch_log_metric_filter.server_errors]
}
