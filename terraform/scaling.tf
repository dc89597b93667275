# Target tracking on the group's average CPU, so that the group moves between asg_min_size and
# asg_max_size by itself. CPU rather than ALBRequestCountPerTarget: the load of a signaling server
# is its open WebSockets and the frames relayed over them, and a WebSocket is one request however
# long it lives, so request counts say little. Scale-in deregisters an instance (its sockets are
# kept for the deregistration delay) and then terminates it, which starts the server's drain;
# its clients reconnect to the other instances.
resource "aws_autoscaling_policy" "cpu" {
  name                   = "${var.name}-cpu"
  autoscaling_group_name = aws_autoscaling_group.road.name
  policy_type            = "TargetTrackingScaling"

  target_tracking_configuration {
    predefined_metric_specification {
      predefined_metric_type = "ASGAverageCPUUtilization"
    }
    target_value = var.scaling_cpu_target_percent
  }
}
