from mars_scale.cli import main

main()
