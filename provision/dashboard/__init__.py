"""`claw fleet dashboard`: one web page for the fleet, its rollouts and its runtimes."""
