from xpack.cli import main

main()
