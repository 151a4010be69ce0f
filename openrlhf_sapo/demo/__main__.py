from openrlhf_sapo.demo.run import main

main()
